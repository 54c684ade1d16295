import Foundation

/// An opt-in event trace for chasing consistency bugs: with `WEFT_TRACE_DIR` set, each process
/// appends one line per event to `DIR/<program>-<pid>.trace`, as
/// `<CLOCK_MONOTONIC ns> <thread> <event>`, written at once (nothing is lost to `kill -9`).
/// The clock is the one the integration tests stamp their histories with, so a trace lines up
/// with a failing history. Off by default: then `note` costs one load of a constant.
public enum Trace {
    public static let enabled: Bool = descriptor >= 0

    private static let descriptor: Int32 = {
        guard let dir = ProcessInfo.processInfo.environment["WEFT_TRACE_DIR"], !dir.isEmpty else { return -1 }
        let program = (CommandLine.arguments.first as NSString?)?.lastPathComponent ?? "weft"
        let path = "\(dir)/\(program)-\(getpid()).trace"
        let fd = open(path, O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0o644)
        if fd >= 0 { append("\(Leases.nowNs()) start \(CommandLine.arguments.joined(separator: " "))\n", to: fd) }
        return fd
    }()

    private static let lock = NSLock()

    /// Appends `event` (evaluated only when tracing).
    public static func note(_ event: @autoclosure () -> String) {
        guard enabled else { return }
        let line = "\(Leases.nowNs()) \(String(UInt(pthread_self()), radix: 16)) \(event())\n"
        lock.withLock { append(line, to: descriptor) }
    }

    private static func append(_ line: String, to fd: Int32) {
        _ = line.utf8CString.withUnsafeBufferPointer { write(fd, $0.baseAddress, $0.count - 1) }
    }
}
