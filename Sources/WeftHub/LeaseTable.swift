import Foundation
import Logging
import WeftProto

/// Which sessions cache what of one volume, and the recalls that keep their caches coherent
/// (SPEC.md §12.6). Owned by the volume's home `Hub`.
///
/// Guarantees:
/// - a read lease on an inode is recorded only for a reply that no change of that inode could
///   have overtaken (`grant` checks a change sequence taken before the read); any other reply
///   gets a notice first, so its holder does not cache it;
/// - `beginChange` returns only when every other session holding a lease on the targets has
///   acknowledged a recall, or has not been heard from for a lease period;
/// - a write lease is exclusive: while one session holds it, no other holds any lease on the file;
/// - a recall ends only the lease it was sent for: a lease its holder took while the recall was
///   under way stands, and the next change recalls it;
/// - a session holding more than `maxLeasesPerSession` leases has its oldest read leases on
///   regular files recalled in the background, down to 7/8 of the bound (a recall is always
///   safe: the holder drops what it cached); directory and write leases are never shed.
///
/// The test-only environment switch `WEFT_TEST_NO_RECALL=1` skips recalls and notices (leases
/// are still granted and dropped), to prove the consistency checker catches stale reads.
public final class LeaseTable: @unchecked Sendable {
    public enum Mode: Sendable { case read, write }

    /// What a change does to an inode, for its recall.
    public struct Target {
        public var ino: InodeID
        /// Entries of directory `ino` added or removed (the holders drop them from the kernel).
        public var names: [[UInt8]]
        /// True when the inode is a regular file: its holders' leases end with the recall. Other
        /// inodes keep theirs (a directory's holder still caches its other entries).
        public var isFile: Bool

        public init(_ ino: InodeID, names: [[UInt8]] = [], isFile: Bool = false) {
            self.ino = ino
            self.names = names
            self.isFile = isFile
        }
    }

    /// One session's lease on one inode. `stamp` is unique per lease: a recall ends only the
    /// lease it was sent for, not a new one its holder took while the recall was under way.
    private struct Lease {
        var mode: Mode
        var stamp: UInt64
        /// A recall of this lease was sent: a grant to its holder now makes a new lease.
        var recalled = false
    }

    private let lock = NSLock()
    private var clients: [SessionID: LeaseClient] = [:]
    private var leases: [InodeID: [SessionID: Lease]] = [:]
    private var stamps: UInt64 = 0
    private var held: [SessionID: Set<InodeID>] = [:]
    private var changing: [InodeID: Int] = [:]
    private var sequence: UInt64 = 0
    /// Sequence of the last change begun on any inode hashing to each bucket.
    private var changedAt = [UInt64](repeating: 0, count: 1 << 16)
    /// Sequence of the last change ended on any inode hashing to each bucket: a read that began
    /// while a change was under way may have seen the inode before it, though the change has
    /// ended by the time the read is granted.
    private var endedAt = [UInt64](repeating: 0, count: 1 << 16)
    private var recallsSent: UInt64 = 0
    /// Most leases one session holds before its oldest read leases on regular files are shed.
    public let maxLeasesPerSession: Int
    public static let defaultMaxLeasesPerSession = 262_144
    /// Whether `ino` is a regular file (only such leases are shed); set by the owning hub.
    public var isRegularFile: @Sendable (InodeID) -> Bool = { _ in false }
    /// Each session's leases in the order they were granted (stamp of the lease then), oldest
    /// first from `head`; entries whose lease ended or changed are skipped when met.
    private struct GrantOrder {
        var entries: [(ino: InodeID, stamp: UInt64)] = []
        var head = 0
        var live: Int { entries.count - head }
    }
    private var order: [SessionID: GrantOrder] = [:]
    private var shedding: Set<SessionID> = []
    /// After a pass that could shed nothing (directory and write leases only): the count a
    /// session must pass before the next pass looks again.
    private var noShedBelow: [SessionID: Int] = [:]
    private var shedCount: UInt64 = 0
    /// Until then (monotonic ns) nothing is read or changed: the grace period after a restart.
    private var graceUntilNs: UInt64 = 0
    public let recallsDisabled: Bool
    let logger: Logger

    public init(logger: Logger, recallsDisabled: Bool = ProcessInfo.processInfo.environment["WEFT_TEST_NO_RECALL"] == "1",
                maxLeasesPerSession: Int = LeaseTable.defaultMaxLeasesPerSession) {
        precondition(maxLeasesPerSession >= 8)
        self.logger = logger
        self.recallsDisabled = recallsDisabled
        self.maxLeasesPerSession = maxLeasesPerSession
        if recallsDisabled { logger.warning("WEFT_TEST_NO_RECALL=1: lease recalls are disabled (test only; caches go stale)") }
    }

    @inline(__always) private func bucket(_ ino: InodeID) -> Int { Int(truncatingIfNeeded: (ino &* 0x9E37_79B9_7F4A_7C15) >> 48) }

    /// Recalls sent so far (notices not counted).
    public var recallCount: UInt64 { lock.withLock { recallsSent } }

    /// Leases shed so far to keep sessions within `maxLeasesPerSession`.
    public var shedLeaseCount: UInt64 { lock.withLock { shedCount } }

    /// How many leases `session` holds.
    public func leaseCount(_ session: SessionID) -> Int { lock.withLock { held[session]?.count ?? 0 } }

    /// Sessions holding leases on `ino`, and how.
    public func holders(_ ino: InodeID) -> [SessionID: Mode] { lock.withLock { (leases[ino] ?? [:]).mapValues(\.mode) } }

    /// Records `session`'s lease on `ino`. A lease it holds that covers `mode` and is not being
    /// recalled stays as it is; otherwise a new lease replaces it. A holder answering a recall
    /// has stopped buffering, so what it is granted meanwhile is a new read lease, which the
    /// recall does not end. Caller holds `lock`.
    private func recordLocked(_ session: SessionID, _ ino: InodeID, _ mode: Mode) {
        if let lease = leases[ino]?[session], !lease.recalled, lease.mode == .write || mode == .read { return }
        stamps += 1
        if leases[ino, default: [:]].updateValue(Lease(mode: mode, stamp: stamps), forKey: session) == nil {
            held[session, default: []].insert(ino)
        }
        order[session, default: GrantOrder()].entries.append((ino, stamps))
        compactOrderLocked(session)
        let count = held[session]?.count ?? 0
        if count > maxLeasesPerSession, count > noShedBelow[session] ?? 0, !shedding.contains(session) {
            shedding.insert(session)
            WorkerPool.detach { [self] in shed(session) }
        }
    }

    /// Drops the order's consumed prefix, and its stale entries once they outnumber the leases.
    /// Caller holds `lock`.
    private func compactOrderLocked(_ session: SessionID) {
        guard let head = order[session]?.head, let count = order[session]?.entries.count else { return }
        if count - head > 2 * (held[session]?.count ?? 0) + 1024 {
            let current = order[session]!.entries[head...].filter { leases[$0.ino]?[session]?.stamp == $0.stamp }
            order[session] = GrantOrder(entries: current, head: 0)
        } else if head > 1024 && head * 2 > count {
            order[session]!.entries.removeFirst(head)  // in place: the dictionary holds the only copy
            order[session]!.head = 0
        }
    }

    /// Recalls of every other session's lease on `target` (of mode `only`, if given), marked as
    /// recalled. Caller holds `lock`.
    private func recallsLocked(_ target: Target, except session: SessionID, only: Mode? = nil) -> [Recall] {
        var work: [Recall] = []
        for (other, lease) in leases[target.ino] ?? [:] where other != session && (only == nil || lease.mode == only) {
            guard let client = clients[other] else { continue }
            leases[target.ino]?[other]?.recalled = true
            work.append(Recall(target: target, session: other, client: client, stamp: lease.stamp))
        }
        return work
    }

    // MARK: Grace period

    /// Starts a grace period of `durationNs`: holders from before a crash may still cache, or hold
    /// buffered writes under write leases they will reclaim.
    public func startGrace(_ durationNs: UInt64) {
        lock.withLock { graceUntilNs = Leases.nowNs() + durationNs }
    }

    public var inGrace: Bool { lock.withLock { Leases.nowNs() < graceUntilNs } }

    /// Waits for the end of the grace period, if any.
    public func waitForGrace() {
        let until = lock.withLock { graceUntilNs }
        while true {
            let now = Leases.nowNs()
            guard now < until else { return }
            usleep(useconds_t(min(until - now, 100_000_000) / 1000))
        }
    }

    // MARK: Sessions

    public func enable(_ session: SessionID, client: LeaseClient) {
        lock.withLock { clients[session] = client }
    }

    public func isEnabled(_ session: SessionID) -> Bool { lock.withLock { clients[session] != nil } }

    /// Forgets the session's leases (it ended).
    public func end(_ session: SessionID) {
        lock.withLock {
            clients[session] = nil
            order[session] = nil
            noShedBelow[session] = nil
            for ino in held.removeValue(forKey: session) ?? [] {
                leases[ino]?[session] = nil
                if leases[ino]?.isEmpty == true { leases[ino] = nil }
            }
        }
    }

    // MARK: Reads

    /// Taken before a read; `grant` compares it with the changes begun since.
    public func readToken() -> UInt64 { lock.withLock { sequence } }

    /// After a read of `inodes` for `session` that began at `token`: records read leases on them,
    /// or sends notices where a change may have overtaken the read: one begun or ended since
    /// `token`, or under way now. `ownChange` is the caller's own change, still under way, whose
    /// result the reply shows (`beginChange`'s token). Returns false when another session's write
    /// lease on one of them had to be recalled first: the caller reads again, so that it sees the
    /// writer's data.
    public func grant(_ session: SessionID, _ inodes: [InodeID], since token: UInt64,
                      ownChange: [Target] = []) -> Bool {
        if inodes.isEmpty { return true }
        var writers: [Recall] = []
        var notices: [InodeID] = []
        let client: LeaseClient? = lock.withLock {
            guard let client = clients[session] else { return nil }
            for ino in inodes {
                writers += recallsLocked(Target(ino, isFile: true), except: session, only: .write)
            }
            guard writers.isEmpty else { return client }
            for ino in inodes {
                let others = changing[ino, default: 0] - ownChange.filter { $0.ino == ino }.count
                if others > 0 || changedAt[bucket(ino)] > token || endedAt[bucket(ino)] > token {
                    notices.append(ino)
                } else {
                    recordLocked(session, ino, .read)
                }
            }
            Trace.note("home grant session=\(session) leases=\(inodes.filter { !notices.contains($0) }) notices=\(notices)")
            return client
        }
        guard let client else { return true }
        if !writers.isEmpty {
            recall(writers)
            return false
        }
        if !recallsDisabled {
            for ino in notices { _ = client.recall(ino, names: [], notice: true, deadlineNs: 0) }
        }
        return true
    }

    /// Tells `session` not to cache what its reply about `ino` shows (a notice).
    public func notice(_ session: SessionID, _ ino: InodeID) {
        guard !recallsDisabled, let client = lock.withLock({ clients[session] }) else { return }
        _ = client.recall(ino, names: [], notice: true, deadlineNs: 0)
    }

    // MARK: Changes

    /// A change of `targets` by `session` is about to be applied: recalls every other session's
    /// lease on them. Returns a token for the changer's own reply (`grant(since:ownChange:)`,
    /// before `endChange`); call `endChange` once the change is applied or has failed.
    public func beginChange(_ session: SessionID, _ targets: [Target]) -> UInt64 {
        var work: [Recall] = []
        lock.withLock {
            sequence += 1
            Trace.note("home change session=\(session) targets=\(targets.map(\.ino)) sequence=\(sequence)")
            for target in targets {
                changing[target.ino, default: 0] += 1
                changedAt[bucket(target.ino)] = sequence
                work += recallsLocked(target, except: session)
            }
        }
        recall(work)
        return lock.withLock { sequence }
    }

    public func endChange(_ targets: [Target]) {
        Trace.note("home change-end targets=\(targets.map(\.ino))")
        lock.withLock {
            sequence += 1
            for target in targets {
                let count = changing[target.ino, default: 0] - 1
                changing[target.ino] = count > 0 ? count : nil
                endedAt[bucket(target.ino)] = sequence
            }
        }
    }

    // MARK: Write leases

    /// Grants `session` the exclusive write lease on file `ino`, recalling other sessions' read
    /// leases on it. If another session holds the write lease, it is recalled and nobody gets
    /// one (both then write through). Nor does anyone while other sessions keep taking new
    /// leases during the recalls (`acquireRoundsMax` rounds): writing through is always correct.
    public func acquireWrite(_ session: SessionID, _ ino: InodeID) -> Bool {
        for _ in 0..<Self.acquireRoundsMax {
            var work: [Recall] = []
            var contested = false
            let granted: Bool = lock.withLock {
                guard clients[session] != nil else { return false }
                contested = (leases[ino] ?? [:]).contains { $0.key != session && $0.value.mode == .write }
                work = recallsLocked(Target(ino, isFile: true), except: session)
                guard work.isEmpty else { return false }
                sequence += 1
                changedAt[bucket(ino)] = sequence
                recordLocked(session, ino, .write)
                return true
            }
            Trace.note("home write-lease session=\(session) ino=\(ino) granted=\(granted) recalls=\(work.count)")
            if granted || work.isEmpty { return granted }
            recall(work)
            if contested { return false }
        }
        return false
    }

    public static let acquireRoundsMax = 3

    /// Gives `session` back the write lease on `ino` it held before its connection ended, if no
    /// other session holds a lease on it now.
    public func reclaimWrite(_ session: SessionID, _ ino: InodeID) -> Bool {
        lock.withLock {
            guard clients[session] != nil else { return false }
            guard (leases[ino] ?? [:]).keys.allSatisfy({ $0 == session }) else { return false }
            sequence += 1
            changedAt[bucket(ino)] = sequence
            recordLocked(session, ino, .write)
            return true
        }
    }

    // MARK: Shedding

    /// Recalls `session`'s oldest read leases on regular files until it holds at most 7/8 of
    /// `maxLeasesPerSession`, 256 at a time, 32 recalls in flight. Leases met that cannot be
    /// shed (directories, write leases, leases being recalled) go to the back of the order; a
    /// round that finds nothing to shed ends it.
    private func shed(_ session: SessionID) {
        while true {
            let shed = shedRounds(session)
            // Grants that came meanwhile may have kept the session above 7/8 of the bound (a
            // grant starts no shed while one runs): shed again until it is there. (Going on
            // only past the bound itself left a session that kept reading during a pass above
            // 7/8 for good: a CI run caught it, 59 of a bound of 64.)
            let again: Bool = lock.withLock {
                let count = held[session]?.count ?? 0
                if shed > 0 {
                    noShedBelow[session] = nil
                    if clients[session] != nil, count > maxLeasesPerSession / 8 * 7 { return true }
                } else if clients[session] != nil {
                    noShedBelow[session] = count + maxLeasesPerSession / 8
                }
                shedding.remove(session)
                return false
            }
            if !again { return }
        }
    }

    /// One pass of `shed`: the number of leases recalled.
    private func shedRounds(_ session: SessionID) -> Int {
        let target = maxLeasesPerSession / 8 * 7
        var total = 0
        var budget = lock.withLock { order[session]?.live ?? 0 }  // entries one pass may examine
        while budget > 0 {
            // The oldest 256 leases still held under the stamp they were granted with.
            let (candidates, excess, client): ([(ino: InodeID, stamp: UInt64)], Int, LeaseClient?) = lock.withLock {
                guard let client = clients[session], order[session] != nil else { return ([], 0, nil) }
                let excess = (held[session]?.count ?? 0) - target
                var picked: [(ino: InodeID, stamp: UInt64)] = []
                while excess > 0, picked.count < 256, budget > 0, order[session]!.live > 0 {
                    let entry = order[session]!.entries[order[session]!.head]
                    order[session]!.head += 1
                    budget -= 1
                    if leases[entry.ino]?[session]?.stamp == entry.stamp { picked.append(entry) }
                }
                return (picked, excess, client)
            }
            guard let client, !candidates.isEmpty else { return total }
            let files = Set(candidates.map(\.ino).filter { isRegularFile($0) })  // outside the lock: a metadata read
            let work: [Recall] = lock.withLock {
                var work: [Recall] = []
                var kept: [(ino: InodeID, stamp: UInt64)] = []   // files beyond the excess: oldest still
                var later: [(ino: InodeID, stamp: UInt64)] = []  // not sheddable now: to the back
                for entry in candidates {
                    guard var lease = leases[entry.ino]?[session], lease.stamp == entry.stamp else { continue }
                    guard files.contains(entry.ino), lease.mode == .read, !lease.recalled else {
                        later.append(entry)
                        continue
                    }
                    if work.count < excess {
                        lease.recalled = true
                        leases[entry.ino]?[session] = lease
                        work.append(Recall(target: Target(entry.ino, isFile: true), session: session, client: client,
                                           stamp: entry.stamp))
                    } else {
                        kept.append(entry)
                    }
                }
                if let head = order[session]?.head {
                    order[session]!.entries.insert(contentsOf: kept, at: head)
                    order[session]!.entries.append(contentsOf: later)
                }
                shedCount += UInt64(work.count)
                return work
            }
            total += work.count
            guard !work.isEmpty else { continue }
            logger.debug("shedding leases", metadata: ["session": "\(session)", "count": "\(work.count)"])
            var start = 0
            while start < work.count {
                recall(Array(work[start..<min(start + 32, work.count)]))
                start += 32
            }
        }
        return total
    }

    // MARK: Recalls

    private struct Recall {
        var target: Target
        var session: SessionID
        var client: LeaseClient
        /// The recalled lease's stamp.
        var stamp: UInt64
    }

    private func recall(_ work: [Recall]) {
        guard !work.isEmpty else { return }
        // Each recall on a thread of its own: they wait for answers (up to a lease period), and
        // must neither wait for one another nor for Dispatch's few threads.
        WorkerPool.runConcurrently(work) { item in self.perform(item) }
    }

    /// Recalls one lease and waits for the holder's answer, or until it has not been heard from
    /// for a lease period; then drops a file lease, unless its holder took it again meanwhile
    /// (a read it sent after handling the recall is cached under that newer lease).
    private func perform(_ item: Recall) {
        Trace.note("home recall session=\(item.session) ino=\(item.target.ino) stamp=\(item.stamp)")
        defer { Trace.note("home recall-done session=\(item.session) ino=\(item.target.ino)") }
        if !recallsDisabled {
            lock.withLock { recallsSent += 1 }
            while true {
                let deadline = item.client.lastHeardNs &+ Leases.periodNs
                if Leases.nowNs() >= deadline {
                    logger.warning("lease holder did not answer a recall within the lease period: its leases are void",
                                   metadata: ["session": "\(item.session)", "ino": "\(item.target.ino)"])
                    break
                }
                if item.client.recall(item.target.ino, names: item.target.names, notice: false, deadlineNs: deadline) { break }
            }
        }
        guard item.target.isFile else { return }
        lock.withLock {
            guard leases[item.target.ino]?[item.session]?.stamp == item.stamp else { return }
            leases[item.target.ino]?[item.session] = nil
            if leases[item.target.ino]?.isEmpty == true { leases[item.target.ino] = nil }
            held[item.session]?.remove(item.target.ino)
        }
    }
}
