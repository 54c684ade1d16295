#if canImport(Glibc)
import Glibc
#endif

/// The `sockaddr_un` of a Unix socket at `path`; nil if the path does not fit (107 bytes at most).
public func unixSocketAddress(_ path: String) -> sockaddr_un? {
    var storage = sockaddr_un()
    storage.sun_family = sa_family_t(AF_UNIX)
    let bytes = Array(path.utf8)
    guard bytes.count < MemoryLayout.size(ofValue: storage.sun_path) else { return nil }
    withUnsafeMutableBytes(of: &storage.sun_path) { raw in
        raw.copyBytes(from: bytes)
        raw[bytes.count] = 0
    }
    return storage
}
