#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif
import CWeftSupport
import Logging
import WeftProto

/// Tracks what the store has written since the last sync, and makes it durable in shared passes.
///
/// Guarantees: when `sync()` returns, every object whose `write` returned before `sync()` was
/// called is on stable storage (file data and directory entry); when `syncRemovals()` returns,
/// so is every delete completed before it was called. Concurrent callers share passes: at most one pass runs at a time, and a caller
/// waits for at most the running pass plus one more. At most `maxPendingFiles` written objects
/// wait for a pass, each holding its descriptor so a writeback error cannot be missed; the
/// write that reaches the bound runs a pass itself (backpressure).
///
/// Objects whose durability the metadata journal carries (SPEC.md §5, "Small objects in the
/// journal") are moved out of the passes by `coverByJournal` into a second list, which
/// `syncJournaled` makes durable later; a pass then skips them and their fan-out directories
/// (a directory that also gained another object, or lost one, is still synced).
final class DurabilityQueue: @unchecked Sendable {
    static let maxPendingFiles = 256
    static let maxJournaledFiles = 256

    private struct PendingFile {
        var fd: Int32
        var id: SliceID
        /// Who is told if a pass fails on it: the inode whose commit names it and that commit's
        /// session (0: none). SPEC.md §3.2, "Objects lost to a failed pass".
        var inode: UInt64 = 0
        var session: UInt64 = 0
    }

    private let root: Int32
    private let logger: Logger
    private let lock = Lock()
    private var pending: [PendingFile] = []
    /// Objects the journal carries whose records are written, not yet synced themselves
    /// (`syncJournaled`), and those whose records are being written.
    private var journaled: [SliceID] = []
    private var covering: Set<SliceID> = []
    /// Objects the journal carries that a failed pass may have left with pages clean but never
    /// written: to be written again from their keys before they are synced (`takeRewriteNeeded`).
    private var rewriteNeeded: Set<SliceID> = []
    /// Objects whose records were being written when a pass failed: once written
    /// (`journalCommitted`) they need a rewrite too, since that pass's writeback may have hit them.
    private var coveringAtFailure: Set<SliceID> = []
    /// Objects waiting for a normal pass when a journaled pass failed: that failure may be
    /// theirs, and only their own descriptors (opened before it) can still be told of it, so
    /// they are never covered by the journal (which closes those descriptors).
    private var pendingAtFailure: Set<SliceID> = []
    private var journaledPassRunning = false
    /// Fan-out directories of the files a pass takes (reset by each pass).
    private var dirtyFanOuts = [Bool](repeating: false, count: 256)
    /// Fan-out directories that lost an entry since the last `syncRemovals`.
    private var removedFanOuts: Set<Int> = []
    /// Sequence number of the latest write or delete registered.
    private var queuedSequence: UInt64 = 0
    /// Every change with a sequence number up to this one has been through a pass.
    private var passedSequence: UInt64 = 0
    private var passRunning = false
    /// How many passes failed; a caller that saw one fail while it waited reports EIO.
    private var failedPasses: UInt64 = 0
    /// Objects of failed passes (durability unknown), until they are deleted.
    private var lost: Set<SliceID> = []
    /// The files of the pass `sync()` runs now (owners may still be assigned to them).
    private var inPass: [PendingFile] = []
    /// One per (inode, session) whose commit named an object of a failed pass, with the two
    /// reports it owes, each given once (like Linux's `errseq_t` cursors, SPEC.md §3.2): to the
    /// file (a durable commit or `syncFile` of the inode, from that session or once it ended)
    /// and to the session (its `sync`). Dropped once both are given.
    private var failures: [Owner: Told] = [:]
    private struct Owner: Hashable {
        var inode: UInt64
        var session: UInt64
    }
    private struct Told: OptionSet {
        let rawValue: UInt8
        static let file = Told(rawValue: 1)
        static let session = Told(rawValue: 2)
        static let both: Told = [.file, .session]
        /// What a new failure of `owner` leaves untold: an owner without an inode (a data hub's
        /// object, §12.5) owes no file report, one without a session (it ended) no session report.
        static func initial(for owner: Owner) -> Told {
            var told: Told = []
            if owner.inode == 0 { told.insert(.file) }
            if owner.session == 0 { told.insert(.session) }
            return told
        }
    }
    private var syncFailureHook: (@Sendable (SliceID) -> Int32?)?
    private var syncfsFailureHook: (@Sendable () -> Int32?)?
    /// Test hook: an errno makes every `syncfs` of the store fail (as a writeback error would).
    var testSyncfsFailure: (@Sendable () -> Int32?)? {
        get { lock.withLock { syncfsFailureHook } }
        set { lock.withLock { syncfsFailureHook = newValue } }
    }
    /// Test hook: an errno makes the pass's fsync of that object fail.
    var testSyncFailure: (@Sendable (SliceID) -> Int32?)? {
        get { lock.withLock { syncFailureHook } }
        set { lock.withLock { syncFailureHook = newValue } }
    }

    /// The store's directory opened once more, for the `syncfs` of the objects the journal
    /// carries alone: Linux keeps a `syncfs` error cursor per open file, so a writeback error
    /// that garbage collection's `syncfs` (on `root`) was told of would otherwise not be told
    /// to this pass, which then dropped the journal keys of objects never written (-1: none,
    /// `root` is used).
    private let journaledRoot: Int32

    init(root: Int32, logger: Logger) {
        self.root = root
        self.logger = logger
        journaledRoot = openat(root, ".", O_RDONLY | O_DIRECTORY | O_CLOEXEC)
    }

    deinit {
        for file in pending { close(file.fd) }
        if journaledRoot >= 0 { close(journaledRoot) }
    }

    /// Whether object `id` was written and no sync pass has taken it yet.
    func isPending(_ id: SliceID) -> Bool {
        lock.withLock { pending.contains { $0.id == id } }
    }

    /// Registers a written object, handing over `fd`. Returns true when the pending bound is
    /// reached and the caller should run `sync()`.
    func objectWritten(id: SliceID, fd: Int32) -> Bool {
        lock.withLock {
            pending.append(PendingFile(fd: fd, id: id))
            queuedSequence += 1
            return pending.count >= Self.maxPendingFiles
        }
    }

    /// Makes `inode` and `session` the owners of those of `ids` that wait for a pass or are in
    /// the running one (a commit of that session about to name them in that inode), and
    /// returns those of `ids` that are lost already (then the commit must not name them). In
    /// one step under the lock, so an object is either lost now, or its pass (if it fails
    /// later) tells these owners, or it was synced.
    func assign(_ ids: [SliceID], inode: UInt64, session: UInt64) -> [SliceID] {
        guard !ids.isEmpty else { return [] }
        let ids = Set(ids)
        return lock.withLock {
            for index in pending.indices where ids.contains(pending[index].id) {
                pending[index].inode = inode
                pending[index].session = session
            }
            for index in inPass.indices where ids.contains(inPass[index].id) {
                inPass[index].inode = inode
                inPass[index].session = session
            }
            return lost.isEmpty ? [] : ids.filter { lost.contains($0) }.sorted()
        }
    }

    /// Those of `ids` that a failed pass took (their durability is unknown).
    func lostObjects(_ ids: [SliceID]) -> [SliceID] {
        lock.withLock { lost.isEmpty ? [] : ids.filter { lost.contains($0) } }
    }

    /// Whether a failed pass took an object a commit of this session named (any file), since
    /// the last call for the session that said so. Each failure tells the session once; the
    /// file's own report stays (`takeFailure(inode:session:)`).
    func takeFailure(session: UInt64) -> Bool {
        take(.session) { $0.session == session }
    }

    /// Whether a failed pass took an object a commit of `inode` named, by `session` or by a
    /// session that has ended, since the last call that said so. Each failure tells the file
    /// once; the session's own report stays. Failures of other live sessions are theirs to hear.
    func takeFailure(inode: UInt64, session: UInt64) -> Bool {
        take(.file) { $0.inode == inode && ($0.session == session || $0.session == 0) }
    }

    private func take(_ report: Told, where matches: (Owner) -> Bool) -> Bool {
        lock.withLock {
            guard !failures.isEmpty else { return false }
            var any = false
            for (owner, told) in failures where matches(owner) && !told.contains(report) {
                any = true
                let now = told.union(report)
                failures[owner] = now == .both ? nil : now
            }
            return any
        }
    }

    /// A failure of `owner`: both its reports are owed again.
    private func recordFailureLocked(_ owner: Owner) {
        failures[owner] = Told.initial(for: owner)
    }

    /// Forgets a session's unreported failure (the session ended).
    func forgetSession(_ session: UInt64) {
        lock.withLock {
            // An inode's failure outlives the session: the file's next durable commit or
            // `syncFile` (from any session) still hears of it.
            let ended = failures.filter { $0.key.session == session }
            guard !ended.isEmpty else { return }
            for (owner, told) in ended {
                failures[owner] = nil
                guard owner.inode != 0, !told.contains(.file) else { continue }
                failures[Owner(inode: owner.inode, session: 0)] = .session
            }
        }
    }

    /// Takes those of `ids` that still wait for a pass out of the passes: the caller puts their
    /// bytes in the metadata journal, in the record that first references them, then calls
    /// `journalCommitted` once that record is written, or `uncover` if the commit failed.
    /// Objects a pass has already taken are not taken (that pass makes them durable before any
    /// journal sync that follows it), nor any beyond `maxJournaledFiles`. Their descriptors are
    /// closed here: the later sync does not need them (`syncJournaled`). Returns the ids taken.
    func coverByJournal(_ ids: [SliceID]) -> [SliceID] {
        var taken: [SliceID] = []
        var descriptors: [Int32] = []
        lock.withLock {
            for id in ids where journaled.count + covering.count + rewriteNeeded.count < Self.maxJournaledFiles {
                guard !pendingAtFailure.contains(id),
                      let index = pending.firstIndex(where: { $0.id == id }) else { continue }
                descriptors.append(pending.remove(at: index).fd)
                covering.insert(id)
                taken.append(id)
            }
        }
        for fd in descriptors { close(fd) }
        return taken
    }

    /// The records carrying `ids` (taken by `coverByJournal`) are written: a later
    /// `syncJournaled` may sync them and let their keys go. (Taking them any earlier could
    /// delete a key before the record that puts it.)
    func journalCommitted(_ ids: [SliceID]) {
        lock.withLock {
            for id in ids where covering.remove(id) != nil {
                if coveringAtFailure.remove(id) != nil { rewriteNeeded.insert(id) } else { journaled.append(id) }
            }
            lock.broadcast()
        }
    }

    /// Gives objects taken by `coverByJournal` back to the passes (their commit failed, and a
    /// retry may reference them without the journal's help), with a descriptor opened again.
    /// They leave `covering` only once back in `pending`, in one step, so that no sync that
    /// starts after they leave can miss them.
    func uncover(_ ids: [SliceID]) {
        let taken = lock.withLock { ids.filter { covering.contains($0) } }
        guard !taken.isEmpty else { return }
        let files = reopened(taken)   // an object gone since is skipped: no pass can sync it
        lock.withLock {
            for id in taken {
                covering.remove(id)
                coveringAtFailure.remove(id)
            }
            if !files.isEmpty {
                pending += files
                queuedSequence += 1
            }
            lock.broadcast()
        }
    }

    /// How many objects the journal carries that are not synced themselves.
    var journaledCount: Int { lock.withLock { journaled.count + covering.count + rewriteNeeded.count } }

    /// Whether `syncfs` reports the file system's writeback errors (Linux 5.8 and later, by
    /// the superblock's error sequence); before that it returned 0 whatever happened.
    static let syncfsReportsErrors: Bool = {
        var name = utsname()
        guard uname(&name) == 0 else { return false }
        let release = withUnsafeBytes(of: name.release) { String(decoding: $0.prefix { $0 != 0 }, as: UTF8.self) }
        let parts = release.split(whereSeparator: { !$0.isNumber }).prefix(2).compactMap { Int($0) }
        guard parts.count == 2 else { return false }
        return parts[0] > 5 || (parts[0] == 5 && parts[1] >= 8)
    }()

    /// Makes the objects the journal carries durable, with their directory entries: one
    /// `syncfs` of the store's file system where it reports writeback errors (it costs about
    /// what one object's `fsync` does, where syncing each object and its directory cost two
    /// disk syncs per object in the background of every small `fsync`, SPEC.md §5), else an
    /// `fsync` of each object and of its fan-out directory. Returns their ids (the caller
    /// deletes their journal keys); a failure throws `JournaledSyncFailure`, and every object the
    /// journal carries then waits in `takeRewriteNeeded` (those whose records are being written,
    /// once written): the caller writes each again from its key and gives it back
    /// (`requeueJournaled`); their keys stay meanwhile. One such pass at a time; a caller that
    /// finds one running, or
    /// nothing to sync, returns an empty list.
    func syncJournaled() throws -> [SliceID] {
        let ids: [SliceID]? = lock.withLock {
            guard !journaledPassRunning, !journaled.isEmpty else { return nil }
            journaledPassRunning = true
            defer { journaled.removeAll(keepingCapacity: true) }
            return journaled
        }
        guard let ids else { return [] }
        defer { lock.withLock { journaledPassRunning = false } }
        do {
            try syncObjects(ids, through: journaledRoot >= 0 ? journaledRoot : root)
        } catch {
            // The error is the file system's (syncfs) or may hide one (a writeback error is told
            // once): every object the journal carries may have lost its pages, not only this
            // pass's. Those queued since and those whose records are being written too.
            lock.withLock {
                rewriteNeeded.formUnion(ids)
                rewriteNeeded.formUnion(journaled)
                journaled.removeAll(keepingCapacity: true)
                coveringAtFailure.formUnion(covering)
                pendingAtFailure.formUnion(pending.map(\.id))
            }
            throw JournaledSyncFailure(ids: ids, error: error as? WeftError ?? WeftError(EIO, "\(error)"))
        }
        return ids
    }

    /// Objects the journal carries, given back to the next `syncJournaled` (written again
    /// after a failed one).
    func requeueJournaled(_ ids: [SliceID]) {
        lock.withLock {
            let queued = Set(journaled)
            journaled += ids.filter { !queued.contains($0) }
        }
    }

    /// Takes `ids` out of the queue of the next pass and out of `takeRewriteNeeded`, for a
    /// caller that writes them again from their keys itself (fsck; no pass runs meanwhile) and
    /// gives each back with `requeueJournaled` or `needRewrite`.
    func takeJournaled(_ ids: Set<SliceID>) {
        lock.withLock {
            journaled.removeAll { ids.contains($0) }
            rewriteNeeded.subtract(ids)
        }
    }

    /// Takes the objects a failed pass left to be written again from their keys.
    func takeRewriteNeeded() -> [SliceID] {
        lock.withLock {
            defer { rewriteNeeded.removeAll() }
            return Array(rewriteNeeded)
        }
    }

    /// Objects whose rewrite failed: taken again by the next `takeRewriteNeeded`, and never
    /// synced (nor their keys dropped) before.
    func needRewrite(_ ids: [SliceID]) {
        lock.withLock { rewriteNeeded.formUnion(ids) }
    }

    /// `syncfs` of the store's file system through `descriptor` (default `root`); EIO (or
    /// ENOSPC) on a failure, logged.
    private func syncfsChecked(_ descriptor: Int32? = nil) throws {
        let injected = testSyncfsFailure?()
        guard injected == nil, weft_syncfs(descriptor ?? root) == 0 else {
            let code = injected ?? errno
            logger.error("chunk sync failed: syncfs of the chunk store: \(String(cString: strerror(code)))")
            throw WeftError(code == ENOSPC || code == EDQUOT ? ENOSPC : EIO, "chunk sync failed: syncfs")
        }
    }

    /// Descriptors of objects `ids` opened again by path, for a pass; objects gone are skipped.
    private func reopened(_ ids: [SliceID]) -> [PendingFile] {
        ids.compactMap { id in
            let fd = FileIO.withObjectPath(id) { openat(root, $0, O_RDONLY | O_CLOEXEC) }
            return fd >= 0 ? PendingFile(fd: fd, id: id) : nil
        }
    }

    /// Makes objects `ids` durable with their directory entries, however they were written
    /// (see `syncJournaled`); objects that are gone are skipped.
    func syncObjects(_ ids: [SliceID], through descriptor: Int32? = nil) throws {
        guard !ids.isEmpty else { return }
        if Self.syncfsReportsErrors { return try syncfsChecked(descriptor) }
        if let failure = runPass(files: reopened(ids), fanOuts: Set(ids.map { Int($0 & 0xFF) }).sorted()) { throw failure }
    }

    /// Registers a removed directory entry, made durable by the next `syncRemovals` (not by
    /// `sync()`: only garbage collection needs a delete durable, before it forgets the object,
    /// and syncing removals in the passes before journal syncs cost a directory `fsync` per
    /// deleted object's directory in the next change's foreground).
    func objectRemoved(id: SliceID) {
        lock.withLock {
            _ = removedFanOuts.insert(Int(id & 0xFF))
            if !lost.isEmpty { lost.remove(id) }
        }
    }

    /// Makes every removal registered before the call durable: one `syncfs` where it reports
    /// writeback errors, else an `fsync` of each directory that lost an entry.
    func syncRemovals() throws {
        let fanOuts = lock.withLock {
            defer { removedFanOuts.removeAll() }
            return removedFanOuts
        }
        guard !fanOuts.isEmpty else { return }
        do {
            if Self.syncfsReportsErrors {
                try syncfsChecked()
            } else if let failure = runPass(files: [], fanOuts: fanOuts.sorted()) {
                throw failure
            }
        } catch {
            lock.withLock { removedFanOuts.formUnion(fanOuts) }
            throw error
        }
    }

    func sync() throws {
        let (ticket, failuresAtEntry) = lock.withLock { (queuedSequence, failedPasses) }
        while true {
            let batch: ([PendingFile], [Int], UInt64)? = try lock.withLock {
                while passRunning && passedSequence < ticket { lock.wait() }
                if passedSequence >= ticket {
                    if failedPasses != failuresAtEntry {
                        throw WeftError(EIO, "a chunk sync pass failed while this sync waited")
                    }
                    return nil
                }
                passRunning = true
                let files = pending
                inPass = files
                pending.removeAll(keepingCapacity: true)
                if !pendingAtFailure.isEmpty { pendingAtFailure.subtract(files.map(\.id)) }
                for file in files { dirtyFanOuts[Int(file.id & 0xFF)] = true }
                var fanOuts: [Int] = []
                for index in 0..<256 where dirtyFanOuts[index] {
                    fanOuts.append(index)
                    dirtyFanOuts[index] = false
                }
                return (files, fanOuts, queuedSequence)
            }
            guard let batch else { return }
            let (files, fanOuts, sequence) = batch
            let failure = runPass(files: files, fanOuts: fanOuts)
            lock.withLock {
                passRunning = false
                passedSequence = max(passedSequence, sequence)
                let owned = inPass
                inPass.removeAll()
                if failure != nil {
                    failedPasses += 1
                    for file in owned {
                        lost.insert(file.id)
                        if file.session != 0 || file.inode != 0 {
                            recordFailureLocked(Owner(inode: file.inode, session: file.session))
                        }
                    }
                }
                lock.broadcast()
            }
            if let failure { throw failure }
        }
    }

    /// fsyncs the files, then the fan-out directories that changed. Returns the first failure,
    /// logged once; the objects of a failed pass are not retried, since after a failed fsync
    /// the kernel may have dropped their data: their durability is unknown.
    ///
    /// A large pass runs its fsyncs on several threads (`fsyncsPerThreadMin` or more each, at
    /// most `passThreadsMax`): they overlap their waits and the block layer merges their cache
    /// flushes (256 objects of 4 MiB: 9-15 ms in one thread, 3-4 ms in 16, C probe). Files
    /// first, then directories, as before.
    private func runPass(files: [PendingFile], fanOuts: [Int]) -> WeftError? {
        let failures = FirstFailure(logger: logger)
        let injected = testSyncFailure
        Self.inParallel(files) { file in
            do {
                if let code = injected?(file.id) { throw FileIO.Failure(call: "fsync", errno: code) }
                try FileIO.fsyncRetrying(file.fd)
            } catch {
                failures.record("fsync of chunk \(hex(file.id))", error)
            }
            close(file.fd)
        }
        Self.inParallel(fanOuts) { [root] index in
            let name = FileIO.fanOutName(index)
            let fd = openat(root, name, O_RDONLY | O_DIRECTORY | O_CLOEXEC)
            guard fd >= 0 else {
                failures.record("open of chunk directory \(name)", FileIO.Failure(call: "open", errno: errno))
                return
            }
            do {
                try FileIO.fsyncRetrying(fd)
            } catch {
                failures.record("fsync of chunk directory \(name)", error)
            }
            close(fd)
        }
        return failures.first
    }

    static let passThreadsMax = 8
    static let fsyncsPerThreadMin = 16

    /// Runs `body` on every item, split over up to `passThreadsMax` threads when there are
    /// enough items to be worth a thread; returns when all are done.
    private static func inParallel<T>(_ items: [T], _ body: @escaping @Sendable (T) -> Void) {
        let threads = min(passThreadsMax, items.count / fsyncsPerThreadMin)
        guard threads > 1 else { return items.forEach(body) }
        let groups = (0..<threads).map { group in stride(from: group, to: items.count, by: threads).map { items[$0] } }
        WorkerPool.runConcurrently(groups) { group in group.forEach(body) }
    }

    /// The first failure of a pass, logged once.
    private final class FirstFailure: @unchecked Sendable {
        private let lock = Lock()
        private var failure: WeftError?
        private let logger: Logger

        init(logger: Logger) { self.logger = logger }

        var first: WeftError? { lock.withLock { failure } }

        func record(_ what: String, _ failure: Error) {
            let error = failure as? FileIO.Failure ?? FileIO.Failure(call: "fsync", errno: EIO)
            lock.withLock {
                guard self.failure == nil else { return }
                let code: Int32 = (error.errno == ENOSPC || error.errno == EDQUOT) ? ENOSPC : EIO
                logger.error("chunk sync failed: \(what): \(error.description)")
                self.failure = WeftError(code, "chunk sync failed: \(what)")
            }
        }
    }
}

/// A failed `syncJournaled` pass: objects `ids` may not be on disk, although their pages may
/// still read back (a failed writeback leaves them clean); their journal keys hold the bytes.
public struct JournaledSyncFailure: Error, CustomStringConvertible {
    public let ids: [SliceID]
    public let error: WeftError
    public var description: String { "\(error) (\(ids.count) object(s) the journal carries)" }
}
