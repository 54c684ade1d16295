import CWeftSupport
import Foundation
import WeftProto
import WeftVFS

/// Which weft mounts exist and which agent process serves each.
public enum MountTable {
    static var registryDirectory: String {
        getuid() == 0 ? "/run/weft" : NSTemporaryDirectory() + "weft-\(getuid())"
    }

    static func registryFile(_ mountpoint: String) -> String {
        let safe = mountpoint.replacingOccurrences(of: "/", with: "%")
        return registryDirectory + "/" + safe + ".pid"
    }

    public static func register(mountpoint: String, pid: pid_t) throws {
        try FileManager.default.createDirectory(atPath: registryDirectory, withIntermediateDirectories: true)
        try "\(pid)\n".write(toFile: registryFile(mountpoint), atomically: true, encoding: .utf8)
    }

    public static func unregister(mountpoint: String) {
        try? FileManager.default.removeItem(atPath: registryFile(mountpoint))
    }

    /// Asks the agent serving `mountpoint` to drop its cached file data (SPEC.md §8).
    public static func dropCache(_ mountpoint: String) throws {
        guard isWeftMount(mountpoint) else { throw WeftError(EINVAL, "\(mountpoint) is not a weft mount") }
        guard setxattr(mountpoint, AgentControl.dropCacheAttribute, "1", 1, 0) == 0 else {
            let code = errno
            if code == EPERM { throw WeftError(EPERM, "dropping the cache of \(mountpoint) needs root") }
            throw WeftError(code, "cannot drop the cache of \(mountpoint)")
        }
    }

    /// The cache statistics of the agent serving `mountpoint` (SPEC.md §8).
    public static func cacheStatistics(_ mountpoint: String) throws -> AgentCacheStatistics {
        guard isWeftMount(mountpoint) else { throw WeftError(EINVAL, "\(mountpoint) is not a weft mount") }
        // The kernel answers ENODATA to anyone else, without asking the agent.
        guard geteuid() == 0 else { throw WeftError(EPERM, "the cache statistics of \(mountpoint) need root") }
        let name = AgentControl.cacheStatisticsAttribute
        // Asked twice: its size, then its bytes (they may grow in between: ERANGE, ask again).
        for _ in 0..<3 {
            let size = getxattr(mountpoint, name, nil, 0)
            guard size >= 0 else { throw failure(errno, mountpoint) }
            var bytes = [UInt8](repeating: 0, count: size + 256)
            let got = bytes.withUnsafeMutableBytes { getxattr(mountpoint, name, $0.baseAddress, $0.count) }
            if got < 0 {
                if errno == ERANGE { continue }
                throw failure(errno, mountpoint)
            }
            do {
                return try AgentCacheStatistics.decoding(Array(bytes[0..<got]))
            } catch {
                throw WeftError(EPROTO, "the agent of \(mountpoint) sent cache statistics this weft cannot read: \(error)")
            }
        }
        throw WeftError(ERANGE, "the cache statistics of \(mountpoint) kept growing")

        func failure(_ code: Int32, _ mountpoint: String) -> WeftError {
            switch code {
            case EPERM, EACCES: WeftError(EPERM, "the cache statistics of \(mountpoint) need root")
            case ENODATA:
                WeftError(ENODATA, "no cache statistics from \(mountpoint): its agent has opened no volume yet, or is an "
                          + "older weft without them, or this process lacks CAP_SYS_ADMIN")
            default: WeftError(code, "cannot read the cache statistics of \(mountpoint)")
            }
        }
    }

    public static func agentPID(_ mountpoint: String) -> pid_t? {
        guard let text = try? String(contentsOfFile: registryFile(mountpoint), encoding: .utf8),
              let pid = pid_t(text.trimmingCharacters(in: .whitespacesAndNewlines)) else { return nil }
        return kill(pid, 0) == 0 ? pid : nil
    }

    /// Mount entries of /proc/self/mountinfo: (mountpoint, fstype).
    static func entries() -> [(String, String)] {
        guard let text = try? String(contentsOfFile: "/proc/self/mountinfo", encoding: .utf8) else { return [] }
        return text.split(separator: "\n").compactMap { line in
            let fields = line.split(separator: " ")
            guard let dash = fields.firstIndex(of: "-"), fields.count > dash + 1, fields.count > 4 else { return nil }
            let point = String(fields[4]).replacingOccurrences(of: "\\040", with: " ")
            return (point, String(fields[dash + 1]))
        }
    }

    public static func isMountpoint(_ path: String) -> Bool {
        let resolved = URL(fileURLWithPath: path).resolvingSymlinksInPath().path
        return entries().contains { $0.0 == resolved }
    }

    public static func isWeftMount(_ path: String) -> Bool {
        let resolved = URL(fileURLWithPath: path).resolvingSymlinksInPath().path
        return entries().contains { $0.0 == resolved && $0.1 == "fuse.weft" }
    }
}
