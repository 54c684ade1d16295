import WeftProto
#if canImport(Glibc)
import Glibc
#endif

/// POSIX permission rules, evaluated against the caller's credentials.
enum Access {
    static let read: UInt32 = 4
    static let write: UInt32 = 2
    static let execute: UInt32 = 1

    /// Throws EACCES unless `credentials` may access `attributes` with every bit of `mask`.
    static func check(_ attributes: Attributes, _ credentials: Credentials, _ mask: UInt32) throws {
        if mask == 0 { return }
        if credentials.isRoot {
            // Root bypasses read/write; execute needs some x bit (or a directory).
            if mask & execute != 0 && !attributes.isDirectory && attributes.mode & 0o111 == 0 {
                throw WeftError.accessDenied
            }
            return
        }
        let bits: UInt32
        if credentials.uid == attributes.uid {
            bits = (attributes.mode >> 6) & 7
        } else if credentials.isMember(of: attributes.gid) {
            bits = (attributes.mode >> 3) & 7
        } else {
            bits = attributes.mode & 7
        }
        if bits & mask != mask { throw WeftError.accessDenied }
    }

    /// The sticky-directory rule for removing or renaming `victim` out of `directory` (EPERM).
    static func checkSticky(directory: Attributes, victim: Attributes, _ credentials: Credentials) throws {
        guard directory.mode & UInt32(S_ISVTX) != 0, !credentials.isRoot else { return }
        if credentials.uid != directory.uid && credentials.uid != victim.uid { throw WeftError.notPermitted }
    }

    static func isOwnerOrRoot(_ attributes: Attributes, _ credentials: Credentials) -> Bool {
        credentials.isRoot || credentials.uid == attributes.uid
    }
}

/// Validates one directory entry name (EINVAL for "/" or NUL or empty, ENAMETOOLONG over 255 bytes).
func validateName(_ name: [UInt8]) throws {
    if name.isEmpty { throw WeftError(ENOENT, "empty name") }
    if name.count > Limits.nameMaxBytes { throw WeftError.nameTooLong }
    if name.contains(0x2F) || name.contains(0) { throw WeftError(EINVAL, "name contains '/' or NUL") }
}

func isDotOrDotDot(_ name: [UInt8]) -> Bool {
    name == [0x2E] || name == [0x2E, 0x2E]
}
