import CWeftSupport
import Foundation
import WeftProto

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
