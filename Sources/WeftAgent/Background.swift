import Foundation
import WeftProto

/// Starts the agent as a detached child and waits until it reports that the mount is usable.
public enum Background {
    /// Longest wait for the child to mount.
    public static let readyTimeoutSeconds = 60.0

    /// Re-runs this executable with `arguments` plus `--notify-fd 3`, in a new session, with its
    /// output appended to `logFile`. Returns when the child reports "ok"; throws its error otherwise.
    public static func spawnAgent(arguments: [String], logFile: String) throws {
        var fds: [Int32] = [0, 0]
        guard pipe(&fds) == 0 else { throw WeftError(errno, "pipe") }
        let readEnd = fds[0], writeEnd = fds[1]
        var actions = posix_spawn_file_actions_t()
        posix_spawn_file_actions_init(&actions)
        defer { posix_spawn_file_actions_destroy(&actions) }
        posix_spawn_file_actions_addopen(&actions, 0, "/dev/null", O_RDONLY, 0)
        posix_spawn_file_actions_addopen(&actions, 1, logFile, O_WRONLY | O_CREAT | O_APPEND, 0o644)
        posix_spawn_file_actions_adddup2(&actions, 1, 2)
        // Close the read end before fd 3 is taken: the pipe's ends may be fds 3 and 4.
        posix_spawn_file_actions_addclose(&actions, readEnd)
        posix_spawn_file_actions_adddup2(&actions, writeEnd, 3)
        var attributes = posix_spawnattr_t()
        posix_spawnattr_init(&attributes)
        defer { posix_spawnattr_destroy(&attributes) }
        posix_spawnattr_setflags(&attributes, Int16(0x80) /* POSIX_SPAWN_SETSID */)
        let executable = URL(fileURLWithPath: "/proc/self/exe").resolvingSymlinksInPath().path
        let argv = [executable] + arguments + ["--notify-fd", "3"]
        var cArgv: [UnsafeMutablePointer<CChar>?] = argv.map { strdup($0) } + [nil]
        defer { cArgv.forEach { free($0) } }
        var pid: pid_t = 0
        let spawned = posix_spawn(&pid, executable, &actions, &attributes, &cArgv, environ)
        close(writeEnd)
        guard spawned == 0 else {
            close(readEnd)
            throw WeftError(spawned, "cannot start the agent")
        }
        defer { close(readEnd) }
        var line = [UInt8]()
        var poller = pollfd(fd: readEnd, events: Int16(POLLIN), revents: 0)
        let deadline = Date().addingTimeInterval(readyTimeoutSeconds)
        while Date() < deadline {
            let waitMs = Int32(max(1, deadline.timeIntervalSinceNow * 1000))
            if poll(&poller, 1, min(waitMs, 1000)) > 0 {
                var byte: UInt8 = 0
                let n = Glibc.read(readEnd, &byte, 1)
                if n <= 0 || byte == 0x0A { break }
                line.append(byte)
            }
        }
        let message = String(decoding: line, as: UTF8.self)
        if message == "ok" { return }
        if message.isEmpty {
            var status: Int32 = 0
            if waitpid(pid, &status, WNOHANG) == 0 { kill(pid, SIGKILL) }
            throw WeftError(EIO, "the agent did not report a usable mount (see \(logFile))")
        }
        throw WeftError(EIO, message.hasPrefix("error: ") ? String(message.dropFirst(7)) : message)
    }
}
