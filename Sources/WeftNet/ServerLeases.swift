import NIOCore
import WeftProto

/// The server's side of one agent connection's leases: sends `recall` callback frames and
/// matches the agent's answers (SPEC.md §12.6, §4 opcode 37). Thread-safe.
final class ConnectionLeases: @unchecked Sendable {
    private let lock = PthreadMutex()
    private let answered = ConditionVariable()
    private var channel: Channel?
    private let sender: DirectSender
    private var pending: Set<UInt64> = []
    private var nextID: UInt64 = 1
    private var heardNs = MonotonicClock.nowNs()

    init(channel: Channel, sender: DirectSender) {
        self.channel = channel
        self.sender = sender
    }

    /// Every frame from the agent proves it alive.
    func heard() { lock.withLock { heardNs = MonotonicClock.nowNs() } }

    var lastHeardNs: UInt64 { lock.withLock { heardNs } }

    /// The agent answered recall `id`.
    func answered(_ id: UInt64) {
        lock.withLock {
            pending.remove(id)
            answered.broadcast()
        }
    }

    /// The connection ended: nothing can be recalled on it any more.
    func closed() {
        lock.withLock {
            channel = nil
            pending.removeAll()
            answered.broadcast()
        }
    }

    /// Sends a recall of `ino` for `session` and waits for its answer until `deadlineNs` (not for
    /// a notice). False if the connection is gone (after waiting out the deadline, so a lease
    /// table polling a closed connection does not spin) or no answer came.
    func recall(session: SessionID, ino: InodeID, names: [[UInt8]], notice: Bool, deadlineNs: UInt64) -> Bool {
        lock.lock()
        guard let channel else {
            while MonotonicClock.nowNs() < deadlineNs, answered.wait(lock, deadlineNs: deadlineNs) {}
            lock.unlock()
            return false
        }
        let id = nextID
        nextID += 1
        if !notice { pending.insert(id) }
        lock.unlock()
        let request = HubRequest.recall(session: session, ino: ino, names: names, notice: notice)
        guard let frame = try? WireCodec.requestBuffer(id: id, request, kind: .callback, allocator: channel.allocator) else {
            lock.withLock { _ = pending.remove(id) }
            return notice
        }
        sender.send(frame)
        if notice { return true }
        lock.lock()
        defer { lock.unlock() }
        while pending.contains(id), self.channel != nil {
            if !answered.wait(lock, deadlineNs: deadlineNs) { break }
        }
        let done = !pending.contains(id) && self.channel != nil
        pending.remove(id)
        return done
    }
}

/// One session's lease client as the hub sees it: the connection it was enabled on.
final class SessionLeaseClient: LeaseClient, @unchecked Sendable {
    let session: SessionID
    let connection: ConnectionLeases

    init(session: SessionID, connection: ConnectionLeases) {
        self.session = session
        self.connection = connection
    }

    func recall(_ ino: InodeID, names: [[UInt8]], notice: Bool, deadlineNs: UInt64) -> Bool {
        connection.recall(session: session, ino: ino, names: names, notice: notice, deadlineNs: deadlineNs)
    }

    var lastHeardNs: UInt64 { connection.lastHeardNs }

    func leasesLost() {}
}
