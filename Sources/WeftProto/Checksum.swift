import CWeftSupport

/// CRC32C of `bytes`, hardware accelerated where the CPU allows.
@inlinable public func crc32c(_ bytes: UnsafeRawBufferPointer, seed: UInt32 = 0) -> UInt32 {
    weft_crc32c(seed, bytes.baseAddress, bytes.count)
}

public func crc32c(_ bytes: [UInt8]) -> UInt32 {
    bytes.withUnsafeBytes { crc32c($0) }
}
