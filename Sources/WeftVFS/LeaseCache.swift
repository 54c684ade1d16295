import Foundation
import WeftProto

/// What the agent may cache under its leases (SPEC.md §12.6), keyed by the kernel's inode numbers.
///
/// A reply may be cached (kernel attribute and entry timeouts, the VFS's layouts) only if no
/// recall of its inode and no loss of leases happened since the call began: the caller takes a
/// `token()` before the call and asks `mayCache(_:since:)` after it. Recalls and notices bump
/// the inode's stamp before anything else, so a reply that follows a recall on the wire is
/// never cached. Shared by every volume of one agent.
public final class LeaseCache: @unchecked Sendable {
    private let lock = NSLock()
    private var sequence: UInt64 = 1
    private var recalledAt = [UInt64](repeating: 0, count: 1 << 16)
    private var lostAt: UInt64 = 0
    private var suspendedUntilNs: UInt64 = 0
    private var recalls: UInt64 = 0

    /// Kernel invalidation (set by the FUSE adapter): attributes and pages of an inode, and one
    /// entry of a directory.
    public var invalidateInode: (@Sendable (UInt64) -> Void)?
    public var invalidateEntry: (@Sendable (UInt64, [UInt8]) -> Void)?
    /// Makes every kernel entry of the mount stale without any lock; false where the kernel
    /// cannot (set by the FUSE adapter).
    public var expireAllEntries: (@Sendable () -> Bool)?
    /// The `GETATTR`s being answered, which an invalidation waits for (set up by the FUSE adapter).
    public let refreshes = RefreshesInFlight()

    public init() {}

    @inline(__always) private func bucket(_ ino: UInt64) -> Int { Int(truncatingIfNeeded: (ino &* 0x9E37_79B9_7F4A_7C15) >> 48) }

    public func token() -> UInt64 { lock.withLock { sequence } }

    /// True if a reply about `ino` to a call that began at `token` may be cached.
    public func mayCache(_ ino: UInt64, since token: UInt64) -> Bool {
        lock.withLock {
            recalledAt[bucket(ino)] <= token && lostAt <= token && Leases.nowNs() >= suspendedUntilNs
        }
    }

    /// Recalls and notices received (tests and `weft status`).
    public var recallCount: UInt64 { lock.withLock { recalls } }

    private var wholeExpiries: UInt64 = 0

    /// Recalls answered by making every kernel entry stale, because the kernel held the
    /// directory's lock (tests).
    public var wholeExpiryCount: UInt64 { lock.withLock { wholeExpiries } }

    func expiredWhole() { lock.withLock { wholeExpiries += 1 } }

    func recalled(_ ino: UInt64) {
        lock.withLock {
            sequence += 1
            recalls += 1
            recalledAt[bucket(ino)] = sequence
        }
    }

    /// Every lease is void: nothing fetched before now may be cached, and nothing at all for a
    /// moment (the hub is reported silent once a second while it stays silent).
    func lost() {
        lock.withLock {
            sequence += 1
            lostAt = sequence
            suspendedUntilNs = Leases.nowNs() + 1_500_000_000
        }
    }
}

/// The `GETATTR`s of each inode the agent is answering, so that a recall's invalidation of the
/// inode can wait for them (SPEC.md §12.6, "A size refresh that a recall overtakes"): the
/// kernel discards the attributes of a `GETATTR` if an invalidation of the inode came after it
/// sent the request, and a `read()` that asked for them to learn the file's size then stops at
/// the size it had. So an invalidation waits while a `GETATTR` of its inode is unanswered, and
/// until `graceNs` after the last answer (the asking thread still has to take it in), at most
/// `waitMaxNs` in all. The home does not wait for this agent to answer a `GETATTR`, so the wait
/// ends. A `GETATTR` the kernel sent but the agent has not read yet is not known here: the
/// window left is that queueing time plus the grace, against the whole round trip to the home
/// before.
public final class RefreshesInFlight: @unchecked Sendable {
    private let condition = NSCondition()
    private var running: [UInt64: Int] = [:]
    private var answeredNs: [UInt64: UInt64] = [:]
    public static let graceNs: UInt64 = 2_000_000
    public static let waitMaxNs: UInt64 = 500_000_000

    public init() {}

    public func begin(_ ino: UInt64) {
        condition.withLock { running[ino, default: 0] += 1 }
    }

    public func end(_ ino: UInt64) {
        condition.withLock {
            let count = running[ino, default: 1] - 1
            running[ino] = count > 0 ? count : nil
            answeredNs[ino] = Leases.nowNs()
            if answeredNs.count > 4096 {
                let now = Leases.nowNs()
                answeredNs = answeredNs.filter { now &- $0.value < Self.graceNs }
            }
            condition.broadcast()
        }
    }

    /// Returns when no `GETATTR` of `ino` is being answered and none was answered within the
    /// grace, or after `waitMaxNs`.
    public func waitForNone(_ ino: UInt64) {
        let deadline = Leases.nowNs() + Self.waitMaxNs
        condition.lock()
        defer { condition.unlock() }
        while true {
            let now = Leases.nowNs()
            guard now < deadline else { return }
            if running[ino] != nil {
                _ = condition.wait(until: Date(timeIntervalSinceNow: Double(deadline - now) / 1e9))
                continue
            }
            guard let answered = answeredNs[ino], now &- answered < Self.graceNs else { return }
            let left = min(Self.graceNs - (now &- answered), deadline - now)
            Trace.note("fuse inval ino=\(ino) waits \(left / 1000) us after a GETATTR answer")
            _ = condition.wait(until: Date(timeIntervalSinceNow: Double(left) / 1e9))
        }
    }
}
