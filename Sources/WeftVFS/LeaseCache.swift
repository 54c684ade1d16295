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
    public func mayCache(_ ino: UInt64, since token: UInt64) -> Bool { mayCache(ino, ino, since: token) }

    /// True if a reply about both `ino` and `other` to a call that began at `token` may be cached.
    public func mayCache(_ ino: UInt64, _ other: UInt64, since token: UInt64) -> Bool {
        lock.withLock {
            recalledAt[bucket(ino)] <= token && recalledAt[bucket(other)] <= token && lostAt <= token
                && Leases.nowNs() >= suspendedUntilNs
        }
    }

    /// Recalls and notices received (tests and `weft status`).
    public var recallCount: UInt64 { lock.withLock { recalls } }

    private var wholeExpiries: UInt64 = 0

    /// Recalls answered by making every kernel entry stale, because the kernel held the
    /// directory's lock (tests).
    public var wholeExpiryCount: UInt64 { lock.withLock { wholeExpiries } }

    func expiredWhole() { lock.withLock { wholeExpiries += 1 } }

    // MARK: Entry drops waiting for a directory's lock

    private let drops = NSCondition()
    /// Names of each directory (kernel inode) whose drop a recall asked for and the kernel has
    /// not done yet, with how many drops of each are under way.
    private var dropsPending: [UInt64: [[UInt8]: Int]] = [:]

    /// A recall asks the kernel to drop `names` of directory `ino` (`dropsEnded` when it has).
    func dropsBegan(_ ino: UInt64, _ names: [[UInt8]]) {
        drops.withLock {
            for name in names { dropsPending[ino, default: [:]][name, default: 0] += 1 }
        }
    }

    func dropsEnded(_ ino: UInt64, _ names: [[UInt8]]) {
        drops.withLock {
            for name in names {
                guard let count = dropsPending[ino]?[name] else { continue }
                dropsPending[ino]?[name] = count > 1 ? count - 1 : nil
            }
            if dropsPending[ino]?.isEmpty == true { dropsPending[ino] = nil }
            drops.broadcast()
        }
    }

    /// True if a recall's drop of entry `name` of directory `ino` is still waiting for the
    /// kernel's lock of the directory after waiting up to `waitNs` for it: the kernel operation
    /// holding that lock may have looked other names up before the recall came (SPEC.md §12.6,
    /// "A rename across another agent's rename").
    public func dropPending(_ ino: UInt64, _ name: [UInt8], waitNs: UInt64) -> Bool {
        drops.lock()
        defer { drops.unlock() }
        guard dropsPending[ino]?[name] != nil else { return false }
        let deadline = Date(timeIntervalSinceNow: Double(waitNs) / 1e9)
        while dropsPending[ino]?[name] != nil {
            guard drops.wait(until: deadline) else { return dropsPending[ino]?[name] != nil }
        }
        return false
    }

    /// This agent changed `ino` itself (its links or ctime: an unlink, link or rename). Its own
    /// changes recall nothing of its own, so a reply about the inode to a call that began
    /// before must not be cached either, even for a file not known yet (an open under way).
    /// Not counted as a recall.
    func changedHere(_ ino: UInt64) {
        lock.withLock {
            sequence += 1
            recalledAt[bucket(ino)] = sequence
        }
    }

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
/// the size it had. So an invalidation waits for the `GETATTR`s of its inode that were being
/// answered when it asked, and until `graceNs` after the last of their answers (the asking
/// thread still has to take it in), at most `waitMaxNs` in all. Later ones do not hold it up:
/// under a steady stream of `stat`s from another process there is always one, and waiting for
/// all of them made every recall of a polled file take the whole bound. The home does not wait
/// for this agent to answer a `GETATTR`, so the wait ends. A `GETATTR` the kernel sent but the
/// agent has not read yet is not known here: the window left is that queueing time plus the
/// grace, against the whole round trip to the home before.
public final class RefreshesInFlight: @unchecked Sendable {
    private let condition = NSCondition()
    private var nextTicket: UInt64 = 0
    /// Tickets of the `GETATTR`s of each inode being answered.
    private var running: [UInt64: [UInt64]] = [:]
    /// Answers of the last `graceNs`, by inode: (ticket, when).
    private var answered: [UInt64: [(ticket: UInt64, ns: UInt64)]] = [:]
    public static let graceNs: UInt64 = 2_000_000
    public static let waitMaxNs: UInt64 = 500_000_000
    /// At most this many inodes' answers are kept for the grace; older ones are pruned then.
    static let answeredInodesMax = 4096

    public init() {}

    /// A `GETATTR` of `ino` is being answered; pass the ticket to `end`.
    public func begin(_ ino: UInt64) -> UInt64 {
        condition.withLock {
            nextTicket += 1
            running[ino, default: []].append(nextTicket)
            return nextTicket
        }
    }

    public func end(_ ino: UInt64, _ ticket: UInt64) {
        condition.withLock {
            let now = Leases.nowNs()
            if var tickets = running[ino], let index = tickets.firstIndex(of: ticket) {
                tickets.remove(at: index)
                running[ino] = tickets.isEmpty ? nil : tickets
            }
            var recent = (answered[ino] ?? []).filter { now &- $0.ns < Self.graceNs }
            recent.append((ticket, now))
            answered[ino] = recent
            if answered.count > Self.answeredInodesMax {
                answered = answered.compactMapValues { list in
                    let kept = list.filter { now &- $0.ns < Self.graceNs }
                    return kept.isEmpty ? nil : kept
                }
            }
            condition.broadcast()
        }
    }

    /// Returns when none of the `GETATTR`s of `ino` under way at the call is being answered and
    /// none of them was answered within the grace, or after `waitMaxNs`.
    public func waitForNone(_ ino: UInt64) {
        let deadline = Leases.nowNs() + Self.waitMaxNs
        condition.lock()
        defer { condition.unlock() }
        let cutoff = nextTicket
        while true {
            let now = Leases.nowNs()
            guard now < deadline else { return }
            if running[ino]?.contains(where: { $0 <= cutoff }) == true {
                _ = condition.wait(until: Date(timeIntervalSinceNow: Double(deadline - now) / 1e9))
                continue
            }
            let last = answered[ino]?.filter { $0.ticket <= cutoff }.map(\.ns).max()
            guard let last, now &- last < Self.graceNs else { return }
            let left = min(Self.graceNs - (now &- last), deadline - now)
            Trace.note("fuse inval ino=\(ino) waits \(left / 1000) us after a GETATTR answer")
            _ = condition.wait(until: Date(timeIntervalSinceNow: Double(left) / 1e9))
        }
    }
}
