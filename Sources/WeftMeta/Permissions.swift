import WeftProto
#if canImport(Glibc)
import Glibc
#endif

/// Validates one directory entry name (EINVAL for "/" or NUL or empty, ENAMETOOLONG over 255 bytes).
func validateName(_ name: [UInt8]) throws {
    if name.isEmpty { throw WeftError(ENOENT, "empty name") }
    if name.count > Limits.nameMaxBytes { throw WeftError.nameTooLong }
    if name.contains(0x2F) || name.contains(0) { throw WeftError(EINVAL, "name contains '/' or NUL") }
}

func isDotOrDotDot(_ name: [UInt8]) -> Bool {
    name == [0x2E] || name == [0x2E, 0x2E]
}
