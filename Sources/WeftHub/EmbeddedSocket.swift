import Foundation
import WeftProto
#if canImport(Glibc)
import Glibc
#endif

/// The Unix socket through which a process that holds a hub directory (an embedded mount or
/// weftd) serves it to local commands such as `weft status DIR` and `weft fsck DIR`.
public enum EmbeddedSocket {
    public static func path(_ directory: String) -> String { directory + "/hub.sock" }

    /// True if a live process answers on the hub directory's socket.
    public static func isServed(_ directory: String) -> Bool {
        let path = self.path(directory)
        guard FileManager.default.fileExists(atPath: path) else { return false }
        let fd = socket(AF_UNIX, Int32(SOCK_STREAM.rawValue), 0)
        guard fd >= 0 else { return false }
        defer { close(fd) }
        guard var address = unixSocketAddress(path) else { return false }
        let result = withUnsafePointer(to: &address) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) {
                connect(fd, $0, socklen_t(MemoryLayout<sockaddr_un>.size))
            }
        }
        return result == 0
    }
}
