#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif
import CWeftSupport
import Foundation
import Logging
import Synchronization
import WeftProto

/// The hub's reading threads (SPEC.md §4, Serving threads): they wait in one epoll set for
/// agent connections to become readable, read them and run the requests they read.
///
/// Guarantees: the kernel wakes one waiting thread per ready connection, and a connection is
/// read by one thread at a time (`HubConnection`); a thread runs the request it read only while
/// another thread still waits, so some thread always reads; with an idle timeout, a connection
/// that sent nothing for that long is ended; `stop()` ends and joins every thread.
final class HubReactor: @unchecked Sendable {
    let epoll: Int32
    private let stopEvent: Int32
    private let logger: Logger
    private static let stopKey: UInt64 = 0

    /// Threads in (or on their way into) `epoll_wait`.
    private let waitingThreads = Atomic<Int>(0)

    // Guarded by `lock`.
    private let lock = PthreadMutex()
    private let changed = ConditionVariable()
    private var connections: [UInt64: HubConnection] = [:]
    private var nextKey: UInt64 = 1
    private var runningThreads = 0
    private var stopping = false

    init(threads: Int, idleTimeoutMs: Int?, logger: Logger) {
        precondition(threads > 0)
        self.logger = logger
        epoll = weft_epoll_create()
        precondition(epoll >= 0, "epoll_create1: \(String(cString: strerror(errno)))")
        stopEvent = weft_eventfd()
        precondition(stopEvent >= 0, "eventfd: \(String(cString: strerror(errno)))")
        precondition(weft_epoll_add_level(epoll, stopEvent, Self.stopKey) == 0,
                     "epoll_ctl: \(String(cString: strerror(errno)))")
        runningThreads = threads + (idleTimeoutMs == nil ? 0 : 1)
        for index in 0..<threads {
            let thread = Thread { [self] in
                serve()
                threadEnded()
            }
            thread.name = "weft-hub-\(index)"
            thread.start()
        }
        if let idleTimeoutMs {
            Thread.detachNewThread { [self] in
                endSilentConnections(idleTimeoutMs: idleTimeoutMs)
                threadEnded()
            }
        }
    }

    /// A number for a new connection's epoll registration (never 0, never reused).
    func makeKey() -> UInt64 {
        lock.withLock {
            defer { nextKey += 1 }
            return nextKey
        }
    }

    /// Starts reading `connection`. False if the reactor is stopping or the connection ended.
    func add(_ connection: HubConnection) -> Bool {
        let added: Bool = lock.withLock {
            guard !stopping else { return false }
            connections[connection.key] = connection
            return true
        }
        guard added else { return false }
        if connection.start() { return true }
        forget(connection.key)
        return false
    }

    /// Drops an ended connection; a late event for its key finds nothing.
    func forget(_ key: UInt64) {
        _ = lock.withLock { connections.removeValue(forKey: key) }
    }

    private func serve() {
        while true {
            waitingThreads.add(1, ordering: .relaxed)
            var key: UInt64 = 0
            let count = weft_epoll_wait_one(epoll, -1, &key)
            let error = errno
            let othersWaiting = waitingThreads.subtract(1, ordering: .relaxed).newValue
            if count < 0 {
                if error == EINTR { continue }
                logger.error("hub reading thread stops", metadata: ["error": "\(String(cString: strerror(error)))"])
                return
            }
            guard count == 1 else { continue }
            if key == Self.stopKey { return }
            guard let connection = lock.withLock({ connections[key] }) else { continue }
            connection.readable(mayRunHere: othersWaiting >= 1)
        }
    }

    private func threadEnded() {
        lock.withLock {
            runningThreads -= 1
            changed.broadcast()
        }
    }

    /// Ends connections that sent nothing for `idleTimeoutMs` (agents ping every
    /// `RemoteHub.heartbeatMs`): their sessions, and the locks they hold, end with them.
    private func endSilentConnections(idleTimeoutMs: Int) {
        let periodMs = max(10, min(1000, idleTimeoutMs / 4))
        let idleNs = UInt64(idleTimeoutMs) * 1_000_000
        while true {
            let snapshot: [HubConnection]? = lock.withLock {
                let deadline = MonotonicClock.deadlineNs(afterMs: periodMs)
                while !stopping, changed.wait(lock, deadlineNs: deadline) {}
                return stopping ? nil : Array(connections.values)
            }
            guard let snapshot else { return }
            for connection in snapshot {
                // The clock read after the connection's last-heard time: never before it.
                let heard = connection.leases.lastHeardNs
                guard MonotonicClock.nowNs() &- heard > idleNs else { continue }
                logger.warning("closing silent agent connection: its sessions end", metadata: ["peer": "\(connection.peer)"])
                connection.end("silent for \(idleTimeoutMs) ms")
            }
        }
    }

    /// Stops and joins every thread (bounded). Call after every connection has ended.
    func stop() {
        lock.withLock {
            stopping = true
            changed.broadcast()
        }
        var one: UInt64 = 1
        // Stays readable: every reading thread sees it in turn.
        _ = write(stopEvent, &one, 8)
        let allEnded: Bool = lock.withLock {
            let deadline = MonotonicClock.deadlineNs(afterMs: 10_000)
            while runningThreads > 0 {
                if !changed.wait(lock, deadlineNs: deadline) { return false }
            }
            return true
        }
        guard allEnded else {
            logger.warning("hub reading threads still running after 10 s")
            return
        }
        Glibc.close(stopEvent)
        Glibc.close(epoll)
    }
}
