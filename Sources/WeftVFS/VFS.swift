import Foundation
import Logging
import Synchronization
import WeftProto

/// Tunables of a node agent.
public struct VFSOptions: Sendable {
    /// Upper bound of buffered, uncommitted write data across all files.
    public var writeBufferBytes: Int = 256 << 20
    /// Upper bound of the block cache.
    public var cacheBytes: Int = 1 << 30
    /// Largest sequential read-ahead window per handle.
    public var readaheadMaxBytes: Int = 32 << 20
    /// Name shown by `weft status`.
    public var agentName: String = "agent"
    /// Volume to open on a cluster hub ("" = the hub's only volume).
    public var volume: String = ""
    /// Buffered writes older than this are committed in the background, so a file kept open
    /// by its writer still reaches the hub (and other mounts' next open) within a bound.
    public var commitIntervalMs: Int = 5_000
    /// Files kept after their last close while a lease covers them: their attributes answer
    /// `lookup`, `getattr` and the next read-only open with no call to the home. About 0.6 KiB
    /// each without layouts (SPEC.md §12.6).
    public var keptFilesMax: Int = 65_536
    /// Of those, the newest that also keep their layouts (which grow with the file).
    public var keptLayoutsMax: Int = 4096

    public init() {}
}

/// Memory that the volumes of one agent share: the block cache (keyed by cluster-unique
/// object ids) and the bound on buffered writes.
public final class VFSShared: @unchecked Sendable {
    let cache: BlockCache
    let budget: DirtyBudget
    public let leaseCache = LeaseCache()

    public init(options: VFSOptions) {
        cache = BlockCache(capacityBytes: options.cacheBytes)
        budget = DirtyBudget(limitBytes: max(options.writeBufferBytes, Limits.chunkSizeMaxBytes))
    }
}

/// The node agent's file system layer: file handles, write-back buffers, readers with
/// read-ahead and the block cache, over any `HubAPI`.
///
/// Guarantees (SPEC.md §Consistency): a mount sees its own writes at once; writes are committed
/// to the hub at flush/close, fsync and when buffers fill, and are durable when fsync returns;
/// another mount sees committed data from its next open (close-to-open).
public final class VFS: @unchecked Sendable {
    public let hub: HubAPI
    public let session: SessionID
    public let volume: VolumeInfo
    public let options: VFSOptions
    let logger: Logger
    let cache: BlockCache
    let chunkSizeBytes: Int
    let budget: DirtyBudget
    let pool: BufferPool
    /// What may be cached under leases; shared by the agent's volumes.
    public let leaseCache: LeaseCache
    /// Added to this volume's inode numbers to give the kernel's (global root: volume id << 48).
    public let kernelInoBase: UInt64
    /// True when the hub grants leases (SPEC.md §12.6). Otherwise the agent caches as §6 allows.
    public private(set) var leasesEnabled = false

    let lock = NSLock()
    var files: [InodeID: OpenFile] = [:]
    /// Files that have (or recently had) handles opened locally, not yet registered at the home
    /// (`OpenFile.localHandles`); entries whose handles are gone are dropped when next scanned.
    var filesWithLocalOpens: Set<InodeID> = []
    /// This agent's own unlinks and renames (see `invalidateFiles`).
    let ownChanges = OwnChanges()
    /// Closed files kept under a lease, least recently closed first (`VFSOptions.keptFilesMax`;
    /// about the newest `keptLayoutsMax` keep their layouts).
    var keptFiles = KeptFiles()
    /// Names of regular files looked up under their directory's lease, with the lease token of
    /// the lookup; valid while no recall of the directory came since.
    var names: [NameKey: (ino: InodeID, token: UInt64)] = [:]
    static let namesMax = 65_536
    /// The entry under which each file was last given to the kernel (`checkSecondName`).
    var givenNames = GivenNames()
    /// The threads whose lookups were answered ESTALE a moment ago (`checkSecondName`).
    var staleRetries = StaleRetries()
    /// `staleRetries.count`, read without the lock by every lookup.
    let staleRetriesCount = Atomic<Int>(0)
    let givenLock = NSLock()

    /// How long a lookup waits for a recall's drop of its name before answering ESTALE (SPEC.md
    /// §12.6, "A rename across another agent's rename"): a drop that waited only for another
    /// operation's lock goes through within microseconds of its release.
    static let lookupDropWaitNs: UInt64 = 5_000_000
    /// How long after it went out an entry that no lease covered may still be held by the
    /// kernel operation that looked it up (`checkSecondName`).
    static let uncoveredEntryWindowNs: UInt64 = 1_000_000_000

    /// Test only: `WEFT_TEST_LOOKUP_DELAY=NAME:MS` makes every lookup of NAME wait MS
    /// milliseconds before it asks the home, so that a test can hold the kernel's directory lock
    /// across another agent's change (SPEC.md §12.6).
    static let testLookupDelay: (name: [UInt8], us: UInt32)? = {
        guard let value = ProcessInfo.processInfo.environment["WEFT_TEST_LOOKUP_DELAY"],
              let colon = value.lastIndex(of: ":"), let ms = UInt32(value[value.index(after: colon)...]) else { return nil }
        return (Array(value[..<colon].utf8), ms * 1000)
    }()
    /// Test only: `WEFT_TEST_RECALL_DELAY=MS` makes every recall (not a notice) wait MS
    /// milliseconds before it is handled, so that a test can keep another agent's change under
    /// way at the home (SPEC.md §12.6).
    static let testRecallDelayUs: UInt32? = ProcessInfo.processInfo.environment["WEFT_TEST_RECALL_DELAY"].flatMap(UInt32.init).map { $0 * 1000 }
    /// Test only: `WEFT_TEST_ENTRY_DROP_DELAY=MS` makes the thread that drops an entry which went
    /// out uncovered (`dropEntry`) wait MS milliseconds first, as a drop whose thread the
    /// scheduler runs late, so that a test can keep it waiting across the kernel's retry.
    static let testEntryDropDelayUs: UInt32? = ProcessInfo.processInfo.environment["WEFT_TEST_ENTRY_DROP_DELAY"].flatMap(UInt32.init).map { $0 * 1000 }
    /// This agent's own unlinks and renames under way, by name (`forgetNames`).
    var namesChanging = NamesChanging()
    /// Bumped before and after each of this agent's own unlinks and renames (`forgetNames`),
    /// which recall nothing of its own: a lookup that ran across one is not kept.
    var namesEpoch: UInt64 = 0
    /// Attributes of directories fetched under their lease, with the lease token of the fetch;
    /// valid while no recall of the directory (and no change of it by this agent) came since.
    var directories: [InodeID: (attributes: Attributes, token: UInt64)] = [:]
    static let directoriesMax = 65_536
    /// Directories whose every name is known (`knownAbsent`).
    var complete = CompleteDirectories()
    /// Bumped by this agent's own changes (`changedHere`): a directory's attributes fetched
    /// across a bump are not kept.
    var directoriesEpoch: UInt64 = 0
    var fileHandles: [UInt64: FileHandle] = [:]
    var directoryHandles: [UInt64: DirectoryHandle] = [:]
    /// Directories removed while open whose attributes `fchmod`, `fchown` or `futimens` then
    /// changed: what their handles show, without asking the home (which may still answer
    /// another session's `getattr` with the last attributes for a while, §12.6). Dropped with
    /// the inode's last handle. Guarded by `lock`.
    var changedRemovedDirectories: [InodeID: Attributes] = [:]
    var nextHandle: UInt64 = 1
    var sliceIDs: (next: SliceID, end: SliceID) = (0, 0)
    /// Closes of registered opens not yet sent to the home.
    let closes = PendingCloses()
    /// Whether the hub takes `discardUploads` (false after its first ENOSYS).
    let hubDiscards = Atomic<Bool>(true)
    /// Layout fetches repeated because a notice overtook the reply (`layoutLocked`; tests).
    public let overtakenFetches = Atomic<UInt64>(0)
    /// Read-ahead steps handed to `prefetchPool` (tests).
    public let readaheadSteps = Atomic<UInt64>(0)
    /// Inodes one of whose commits failed in a way after which it may still apply at the hub
    /// (a timeout, a lost connection): the next commit of each first waits for it there with a
    /// `barrier` (SPEC.md §4, Barriers). Kept here, not in the open file, which may be dropped
    /// and opened again meanwhile.
    let uncertainCommits = Mutex<Set<InodeID>>([])
    /// Raised when the hub says uploads may be lost (ESTALE from a commit or a sync): every
    /// staged chunk uploaded before is written again before it is committed (SPEC.md §3.2,
    /// "Objects lost to a failed pass"; a data hub reports such a loss once per session, not
    /// per object).
    let uploadEpoch = Atomic<UInt64>(0)
    let sliceIDBatch: UInt32 = 256
    /// Runs read-ahead: one chunk-object fetch per thread, so that up to `prefetchThreads` run at
    /// once (Dispatch's queues would run about one per CPU). Shared by every volume of the process.
    var prefetchPool: WorkerPool { Self.prefetchPool }
    static let prefetchThreads = 8
    static let prefetchPool = WorkerPool(name: "weft-prefetch", threads: prefetchThreads)

    /// `shared` lets several volumes of one agent (the global root) share one block cache and
    /// one write-buffer bound, so the agent's memory bound does not grow with the volumes.
    public init(hub: HubAPI, options: VFSOptions, logger: Logger, shared: VFSShared? = nil,
                kernelInoBase: UInt64 = 0) throws {
        self.hub = hub
        self.kernelInoBase = kernelInoBase
        self.options = options
        self.logger = logger
        (session, volume) = try hub.openSession(agentName: options.agentName, volume: options.volume)
        chunkSizeBytes = Int(volume.chunkSizeBytes)
        cache = shared?.cache ?? BlockCache(capacityBytes: options.cacheBytes)
        budget = shared?.budget ?? DirtyBudget(limitBytes: max(options.writeBufferBytes, chunkSizeBytes))
        pool = BufferPool(bufferBytes: chunkSizeBytes, maxBuffers: max(2, min(16, options.writeBufferBytes / chunkSizeBytes)))
        leaseCache = shared?.leaseCache ?? LeaseCache()
        do {
            try hub.enableLeases(session, client: self)
            leasesEnabled = true
        } catch let error as WeftError where error.errno == ENOTSUP || error.errno == ENOSYS {
            logger.info("hub grants no leases: caching as close-to-open (\(error.message))")
        }
        if let delay = Self.testRecallDelayUs {
            logger.warning("WEFT_TEST_RECALL_DELAY: every recall waits \(delay / 1000) ms (test only)")
        }
        if let delay = Self.testEntryDropDelayUs {
            logger.warning("WEFT_TEST_ENTRY_DROP_DELAY: every drop of an uncovered entry waits \(delay / 1000) ms (test only)")
        }
        if let delay = Self.testLookupDelay {
            logger.warning("WEFT_TEST_LOOKUP_DELAY: every lookup of \(String(decoding: delay.name, as: UTF8.self)) waits \(delay.us / 1000) ms (test only)")
        }
        startBackgroundCommits()
    }

    private let stopCondition = NSCondition()
    private var stopping = false

    /// Once a second, commits files whose oldest buffered write is older than `commitIntervalMs`.
    private func startBackgroundCommits() {
        let thread = Thread { [weak self] in
            while let self {
                self.stopCondition.lock()
                if !self.stopping { _ = self.stopCondition.wait(until: Date().addingTimeInterval(1)) }
                let stop = self.stopping
                self.stopCondition.unlock()
                if stop { return }
                self.commitStaleBuffers()
            }
        }
        thread.name = "weft-vfs-commit"
        thread.start()
    }

    func commitStaleBuffers() {
        let oldestAllowed = currentTimeNs() - Int64(options.commitIntervalMs) * 1_000_000
        lock.lock()
        let candidates = files.values.filter { $0.dirtyBytes > 0 }
        lock.unlock()
        for file in candidates {
            file.lock.lock()
            if file.hasDirtyData && file.dirtySinceNs <= oldestAllowed && Leases.nowNs() >= file.nextCommitAttemptNs {
                do { try flushLocked(file, context: context(.root), durable: false) } catch {
                    let delay = Self.commitRetryDelayMs(failures: file.commitFailures)
                    if file.hasDirtyData {
                        logger.warning("background commit of inode \(file.ino) failed, will retry in \(delay) ms: \(error)")
                    } else {
                        logger.warning("background commit of inode \(file.ino) failed and its writes were dropped: \(error)")
                    }
                }
            }
            file.lock.unlock()
        }
    }

    public func context(_ credentials: Credentials) -> RequestContext {
        RequestContext(session: session, credentials: credentials)
    }

    /// Commits every buffered write durably and ends the session.
    public func shutdown() throws {
        stopCondition.lock()
        stopping = true
        stopCondition.broadcast()
        stopCondition.unlock()
        try flushAll(durable: true)
        closes.drain()
        try? hub.closeSession(session)
    }

    // MARK: namespace

    /// `caller`: the thread that asked (the FUSE request's pid; 0 if unknown), which tells the
    /// kernel's retry of a lookup answered ESTALE (`checkSecondName`).
    public func lookup(_ credentials: Credentials, parent: InodeID, name: [UInt8], caller: Int32 = 0) throws -> Attributes {
        let key = NameKey(parent: parent, name: name)
        Trace.note("lookup parent=\(parent) name=\(String(decoding: name, as: UTF8.self)) asked by \(caller)")
        guard leasesEnabled, caller != 0, staleRetriesCount.load(ordering: .relaxed) > 0,
              let stale = givenLock.withLock({ updatingStaleRetries { $0.retry(caller, key, now: Leases.nowNs()) } }) else {
            return try lookup(credentials, key, caller: caller, retryPassing: nil)
        }
        do {
            return try lookup(credentials, key, caller: caller, retryPassing: stale)
        } catch {
            givenLock.withLock { updatingStaleRetries { $0.remove(caller) } }
            throw error
        }
    }

    /// `retryPassing`: this lookup belongs to the kernel's retry of a call answered ESTALE
    /// because of that entry (`StaleRetries`).
    private func lookup(_ credentials: Credentials, _ key: NameKey, caller: Int32,
                        retryPassing stale: GivenNames.Given?) throws -> Attributes {
        let (parent, name) = (key.parent, key.name)
        // A name this agent looked up under the directory's lease, of a file it holds under a
        // lease: no call to the home.
        if leasesEnabled, let known = lock.withLock({ names[key] }),
           leaseCache.mayCache(kernelIno(parent), since: known.token),
           let file = openFile(known.ino), file.isFresh {
            gaveEntry(known.ino, parent, name)
            file.lock.lock()
            defer { file.lock.unlock() }
            return file.visibleAttributes
        }
        // A name missing from a directory whose every name is known: no call either.
        if knownAbsent(parent, name) { throw WeftError(ENOENT) }
        let token = leaseCache.token()
        let epoch = lock.withLock { namesEpoch }
        if let delay = Self.testLookupDelay, delay.name == name { usleep(delay.us) }
        let attributes = try hub.lookup(context(credentials), parent: parent, name: name)
        if leasesEnabled { try checkSecondName(of: attributes.ino, key, since: token, caller: caller, retryPassing: stale) }
        if leasesEnabled && attributes.isRegular && leaseCache.mayCache(kernelIno(parent), since: token) {
            lock.withLock {
                guard epoch == namesEpoch else { return }
                if names.count >= Self.namesMax { names.removeAll(keepingCapacity: true) }
                names[key] = (attributes.ino, token)
            }
        }
        return localView(attributes)
    }

    /// ESTALE for a lookup that finds file `ino` under `key` when the kernel may still hold
    /// another entry for it from before the home moved it, in the operation that asked (SPEC.md
    /// §12.6, "A rename across another agent's rename"): a recall's drop of that entry is still
    /// waiting for its directory's lock, or the entry went out uncovered a moment ago and cannot
    /// be dropped now either. ESTALE makes the kernel let go of the lock, which lets the drop
    /// through, and start the operation again with every name looked up again. That retry
    /// (`retryPassing`, `LOOKUP_REVAL`) looks up again every entry the operation would use, the
    /// stale one included, so the entry that was answered ESTALE does not stop it: a drop still
    /// waiting then (the retry took the directory's lock back before the drop's thread ran)
    /// would otherwise fail the call. Any other entry is checked as always, and the record of
    /// the stale one stays for other calls.
    func checkSecondName(of ino: InodeID, _ key: NameKey, since token: UInt64, caller: Int32 = 0,
                         retryPassing stale: GivenNames.Given? = nil) throws {
        guard key.name != [0x2E], key.name != [0x2E, 0x2E] else { return }
        let now = Leases.nowNs()
        let covered = leaseCache.mayCache(kernelIno(key.parent), kernelIno(ino), since: token)
        let earlier = givenLock.withLock { () -> GivenNames.Given? in
            if let stale, givenNames.other(ino, than: key) == stale { return stale }
            return givenNames.otherOrGave(ino, key, covered: covered, now: now)
        }
        if let earlier, earlier == stale {
            let waiting = leaseCache.dropPending(kernelIno(earlier.key.parent), earlier.key.name, waitNs: 0)
            Trace.note("lookup parent=\(key.parent) name=\(String(decoding: key.name, as: UTF8.self)) inode \(ino) answered in the kernel's retry after ESTALE, which looks up \(earlier.key.parent)/\(String(decoding: earlier.key.name, as: UTF8.self)) again before using it (its drop \(waiting ? "still waiting" : "done"))")
        } else if let earlier {
            let directory = kernelIno(earlier.key.parent)
            var held = leaseCache.dropPending(directory, earlier.key.name, waitNs: Self.lookupDropWaitNs)
            if !held && !earlier.covered && now &- earlier.ns < Self.uncoveredEntryWindowNs {
                held = !dropEntry(earlier.key, of: ino)
            }
            if held {
                Trace.note("lookup parent=\(key.parent) name=\(String(decoding: key.name, as: UTF8.self)) ESTALE: inode \(ino) may still be held as \(earlier.key.parent)/\(String(decoding: earlier.key.name, as: UTF8.self))")
                if caller != 0 {
                    givenLock.withLock { updatingStaleRetries { $0.answered(caller, key, stale: earlier, now: Leases.nowNs()) } }
                }
                throw WeftError(ESTALE, "another entry of this file may be held stale by the kernel; look it up again")
            }
            givenLock.withLock { givenNames.gave(ino, key, covered: covered, now: now) }
        }
    }

    /// This agent's own create, link or the like gave the kernel an entry for file `ino`.
    func gaveEntry(_ ino: InodeID, _ parent: InodeID, _ name: [UInt8], keepingEarlier: Bool = false) {
        guard leasesEnabled else { return }
        let now = Leases.nowNs()
        givenLock.withLock {
            givenNames.gave(ino, NameKey(parent: parent, name: name), covered: true, now: now, keepingEarlier: keepingEarlier)
        }
    }

    /// Changes `staleRetries` and its count; under `givenLock`.
    private func updatingStaleRetries<T>(_ body: (inout StaleRetries) -> T) -> T {
        let result = body(&staleRetries)
        staleRetriesCount.store(staleRetries.count, ordering: .relaxed)
        return result
    }

    /// Drops the kernel's entry `key` (last given for file `ino`) on a thread of its own, unless
    /// a drop of it is under way already; true if the kernel has dropped it within
    /// `lookupDropWaitNs` (it waits for the directory's lock). Once dropped, even later, the
    /// entry counts as covered.
    func dropEntry(_ key: NameKey, of ino: InodeID) -> Bool {
        guard let invalidateEntry = leaseCache.invalidateEntry else { return true }
        let directory = kernelIno(key.parent)
        let cache = leaseCache
        if !cache.dropPending(directory, key.name, waitNs: 0) {
            cache.dropsBegan(directory, [key.name])
            WorkerPool.detach { [self] in
                if let delay = Self.testEntryDropDelayUs { usleep(delay) }
                invalidateEntry(directory, key.name)
                Trace.note("lookup parent=\(key.parent) name=\(String(decoding: key.name, as: UTF8.self)) entry dropped")
                givenLock.withLock { givenNames.dropped(ino, key) }
                cache.dropsEnded(directory, [key.name])
            }
        }
        return !cache.dropPending(directory, key.name, waitNs: Self.lookupDropWaitNs)
    }

    /// Forgets names this agent is about to change itself (its own changes recall nothing of
    /// its own); `forgetNames(after:)` forgets them again after the change, so that no lookup
    /// running across the change keeps the old name. Returns the files the names had, when
    /// every one of them was known under its directory's lease.
    func forgetNames(before keys: [NameKey]) -> NamesChange {
        lock.withLock {
            var inodes: [InodeID]? = []
            for key in keys {
                if let known = names[key], leaseCache.mayCache(kernelIno(key.parent), since: known.token) {
                    inodes?.append(known.ino)
                } else {
                    inodes = nil
                }
                names[key] = nil
            }
            namesEpoch &+= 1
            let id = namesChanging.begin(keys)
            return NamesChange(keys: keys, inodes: inodes, id: id)
        }
    }

    /// After this agent's own unlink or rename of `change.keys`: forgets the names again, and
    /// marks stale the attributes it keeps of the files whose links or ctime changed. Only the
    /// files the names had, when they were known and no other own unlink or rename of one of
    /// the same names overlapped this one (that one could have changed which file a name has);
    /// otherwise every file (which one changed is not known here).
    func forgetNames(after change: NamesChange) {
        let alone: Bool = lock.withLock {
            namesEpoch &+= 1
            for key in change.keys { names[key] = nil }
            return namesChanging.end(change.id, change.keys)
        }
        if alone, let inodes = change.inodes {
            for ino in inodes {
                leaseCache.changedHere(kernelIno(ino))
                openFile(ino)?.invalidate()
            }
        } else {
            invalidateFiles()
        }
    }

    /// What `forgetNames(before:)` saw.
    struct NamesChange {
        var keys: [NameKey]
        /// The files the names had; nil if any was unknown.
        var inodes: [InodeID]?
        /// Its entry in `namesChanging`.
        var id: UInt64
    }

    /// After this agent's own change of `inodes` (a directory's entries, or an inode's
    /// attributes; the home recalls nothing of the changer's own): the directory attributes it
    /// keeps of them, and any fetched while the change was under way, are stale. With
    /// `allDirectories`, every kept directory's too (a moved or removed directory, whose inode
    /// is not known here).
    func changedHere(_ inodes: InodeID..., allDirectories: Bool = false) {
        lock.withLock {
            directoriesEpoch &+= 1
            if allDirectories {
                directories.removeAll()
            } else {
                for ino in inodes { directories[ino] = nil }
            }
        }
    }

    /// `changedHere(parent)` for this agent's own change of directory `parent` whose reply
    /// carried the directory's attributes after it: they are kept, unless another own change
    /// began since `epoch` or a recall came since `token` (then they are dropped as usual).
    func changedHere(_ parent: InodeID, keeping attributes: Attributes, fetchedAt epoch: UInt64, token: UInt64) {
        let keep = leasesEnabled && attributes.isDirectory && leaseCache.mayCache(kernelIno(parent), since: token)
        lock.withLock {
            let unchanged = directoriesEpoch == epoch
            directoriesEpoch &+= 1
            if keep && unchanged {
                directories[parent] = (attributes, token)
            } else {
                directories[parent] = nil
            }
        }
    }

    public func getattr(_ credentials: Credentials, ino: InodeID) throws -> Attributes {
        // A file this agent holds under a lease (open, or closed and kept): no call to the home.
        if leasesEnabled, let file = openFile(ino), file.isFresh {
            file.lock.lock()
            defer { file.lock.unlock() }
            return file.visibleAttributes
        }
        if leasesEnabled, let kept = lock.withLock({ directories[ino] }),
           leaseCache.mayCache(kernelIno(ino), since: kept.token) {
            return kept.attributes
        }
        let token = leaseCache.token()
        let (epoch, changedAfterRemoval) = lock.withLock { (directoriesEpoch, changedRemovedDirectories[ino]) }
        if let changedAfterRemoval { return Self.removed(changedAfterRemoval) }
        let fresh: Attributes
        do {
            fresh = try hub.getattr(context(credentials), ino: ino)
        } catch let error as WeftError where error.errno == ENOENT {
            // A directory removed while this agent holds it open: its handle still shows it,
            // with no links and no entries, as on a local file system (SPEC.md §6).
            guard let handle = lock.withLock({ directoryHandles.values.first { $0.ino == ino } }) else { throw error }
            return handle.lock.withLock { Self.removed(handle.attributes) }
        }
        if leasesEnabled && fresh.isDirectory && leaseCache.mayCache(kernelIno(ino), since: token) {
            lock.withLock {
                guard epoch == directoriesEpoch else { return }
                if directories.count >= Self.directoriesMax { directories.removeAll(keepingCapacity: true) }
                directories[ino] = (fresh, token)
            }
        }
        let view = localView(fresh)
        logger.trace("getattr \(ino): hub size \(fresh.size) v\(fresh.dataVersion), local size \(view.size)")
        return view
    }

    /// Overlays what this agent has buffered but not committed on attributes from the hub.
    func localView(_ attributes: Attributes) -> Attributes {
        guard attributes.isRegular, let file = openFile(attributes.ino) else { return attributes }
        file.lock.lock()
        defer { file.lock.unlock() }
        file.adopt(attributes)
        return file.visibleAttributes
    }

    public func setattr(_ credentials: Credentials, ino: InodeID, _ changes: SetAttributes) throws -> Attributes {
        defer { changedHere(ino) }
        if let file = openFile(ino) {
            file.lock.lock()
            defer { file.lock.unlock() }
            try flushLocked(file, context: context(credentials), durable: false)
            let attributes = try hub.setattr(context(credentials), ino: ino, changes)
            file.adopt(attributes)
            if changes.size != nil { file.layouts.removeAll() }
            return attributes
        }
        do {
            return try hub.setattr(context(credentials), ino: ino, changes)
        } catch let error as WeftError where error.errno == ENOENT {
            // fchmod, fchown or futimens of a directory removed while this agent holds it open:
            // a local file system changes the unlinked inode, which only open handles still
            // reach, so the change goes to this agent's handles of it (SPEC.md §6).
            // One change at a time (under `lock`), each on the last one's result.
            let changed: Attributes? = try lock.withLock {
                let handles = directoryHandles.values.filter { $0.ino == ino }
                guard let first = handles.first else { return nil }
                if changes.size != nil { throw WeftError.isDirectory }
                var attributes = changedRemovedDirectories[ino] ?? first.lock.withLock { first.attributes }
                let now = currentTimeNs()
                try changes.applyModeOwnerAndTimes(to: &attributes, credentials, now: now)
                attributes.ctimeNs = now
                changedRemovedDirectories[ino] = attributes
                for handle in handles { handle.lock.withLock { handle.attributes = attributes } }
                return attributes
            }
            guard let changed else { throw error }
            return Self.removed(changed)
        }
    }

    /// A removed directory's attributes as its open handles show them: no links, no entries.
    static func removed(_ attributes: Attributes) -> Attributes {
        var removed = attributes
        removed.nlink = 0
        removed.size = 0
        return removed
    }

    public func mkdir(_ credentials: Credentials, parent: InodeID, name: [UInt8], mode: UInt32, umask: UInt32) throws -> Attributes {
        defer { changedHere(parent) }
        let token = leaseCache.token()
        let made = try changingEntries(of: parent) {
            try hub.mkdir(context(credentials), parent: parent, name: name, mode: mode, umask: umask)
        }
        entriesChanged(parent, added: name)
        gaveEntry(made.ino, parent, name)
        madeEmptyDirectory(made.ino, since: token)
        return made
    }

    public func mknod(_ credentials: Credentials, parent: InodeID, name: [UInt8], mode: UInt32, rdev: UInt32,
                      umask: UInt32) throws -> Attributes {
        defer { changedHere(parent) }
        let made = try changingEntries(of: parent) {
            try hub.create(context(credentials), parent: parent, name: name, mode: mode, rdev: rdev, umask: umask,
                           exclusive: true)
        }
        entriesChanged(parent, added: name)
        gaveEntry(made.ino, parent, name)
        return made
    }

    public func unlink(_ credentials: Credentials, parent: InodeID, name: [UInt8]) throws {
        registerLocalOpens()
        let change = forgetNames(before: [NameKey(parent: parent, name: name)])
        let token = leaseCache.token()
        let epoch = lock.withLock { directoriesEpoch }
        let parentAfter: Attributes?
        do {
            parentAfter = try changingEntries(of: parent) {
                try hub.unlinkEntry(context(credentials), parent: parent, name: name)
            }
        } catch {
            forgetNames(after: change)
            changedHere(parent)
            throw error
        }
        forgetNames(after: change)   // the removed file's link count changed
        entriesChanged(parent, removed: name)
        // The reply carried the directory as it is now: the kernel's getattr needs no call.
        if let parentAfter {
            changedHere(parent, keeping: parentAfter, fetchedAt: epoch, token: token)
        } else {
            changedHere(parent)
        }
    }

    public func rmdir(_ credentials: Credentials, parent: InodeID, name: [UInt8]) throws {
        defer { changedHere(parent, allDirectories: true) }
        try changingEntries(of: parent) { try hub.rmdir(context(credentials), parent: parent, name: name) }
        entriesChanged(parent, removed: name)
    }

    public func symlink(_ credentials: Credentials, parent: InodeID, name: [UInt8], target: [UInt8]) throws -> Attributes {
        defer { changedHere(parent) }
        let made = try changingEntries(of: parent) {
            try hub.symlink(context(credentials), parent: parent, name: name, target: target)
        }
        entriesChanged(parent, added: name)
        gaveEntry(made.ino, parent, name)
        return made
    }

    public func readlink(_ credentials: Credentials, ino: InodeID) throws -> [UInt8] {
        try hub.readlink(context(credentials), ino: ino)
    }

    public func link(_ credentials: Credentials, ino: InodeID, newParent: InodeID, newName: [UInt8]) throws -> Attributes {
        defer { changedHere(newParent) }
        let attributes = try changingEntries(of: newParent) {
            try hub.link(context(credentials), ino: ino, newParent: newParent, newName: newName)
        }
        entriesChanged(newParent, added: newName)
        gaveEntry(ino, newParent, newName, keepingEarlier: true)
        // Its link count and ctime changed (this agent is not recalled).
        leaseCache.changedHere(kernelIno(ino))
        openFile(ino)?.invalidate()
        return localView(attributes)
    }

    public func rename(_ credentials: Credentials, parent: InodeID, name: [UInt8], newParent: InodeID,
                       newName: [UInt8], flags: RenameFlags) throws {
        registerLocalOpens()
        let change = forgetNames(before: [NameKey(parent: parent, name: name), NameKey(parent: newParent, name: newName)])
        defer {
            forgetNames(after: change)   // ctime of the moved file, links of a replaced one
            changedHere(parent, newParent, allDirectories: true)   // a moved directory's ctime and ".."
        }
        try changingEntries(of: parent, newParent) {
            try hub.rename(context(credentials), parent: parent, name: name, newParent: newParent, newName: newName,
                           flags: flags)
        }
        if !flags.contains(.exchange) {   // an exchange keeps both names where they were
            entriesChanged(parent, removed: name)
            entriesChanged(newParent, added: newName)
        }
        if leasesEnabled {
            givenLock.withLock {
                givenNames.renamed(NameKey(parent: parent, name: name), NameKey(parent: newParent, name: newName),
                                   exchange: flags.contains(.exchange))
            }
        }
    }

    public func access(_ credentials: Credentials, ino: InodeID, mask: UInt32) throws {
        try hub.access(context(credentials), ino: ino, mask: mask)
    }

    public func statfs(_ credentials: Credentials) throws -> FileSystemStats {
        try hub.statfs(context(credentials))
    }

    /// `security.*` attributes of a file the agent holds under a lease are answered from what it
    /// read before, while no recall or own change came since (SPEC.md §12.6): the kernel asks
    /// for `security.capability` before every write(2). The home lets any caller read them, so
    /// the answer does not depend on the caller. Other names always go to the home.
    public func getxattr(_ credentials: Credentials, ino: InodeID, name: [UInt8]) throws -> [UInt8] {
        guard leasesEnabled, name.starts(with: Self.securityXattrPrefix), let file = openFile(ino) else {
            return try hub.getxattr(context(credentials), ino: ino, name: name)
        }
        if let cached = file.cachedSecurityXattr(name) {
            guard let value = cached else { throw WeftError.noData }
            return value
        }
        let snapshot = file.currentGeneration
        do {
            let value = try hub.getxattr(context(credentials), ino: ino, name: name)
            file.cacheSecurityXattr(name, value, since: snapshot)
            return value
        } catch let error as WeftError where error.errno == ENODATA {
            file.cacheSecurityXattr(name, nil, since: snapshot)
            throw error
        }
    }

    static let securityXattrPrefix = Array("security.".utf8)

    public func setxattr(_ credentials: Credentials, ino: InodeID, name: [UInt8], value: [UInt8], flags: XattrFlags) throws {
        defer {
            openFile(ino)?.invalidate()   // ctime
            changedHere(ino)
        }
        try hub.setxattr(context(credentials), ino: ino, name: name, value: value, flags: flags)
    }

    public func listxattr(_ credentials: Credentials, ino: InodeID) throws -> [[UInt8]] {
        try hub.listxattr(context(credentials), ino: ino)
    }

    public func removexattr(_ credentials: Credentials, ino: InodeID, name: [UInt8]) throws {
        defer {
            openFile(ino)?.invalidate()   // ctime
            changedHere(ino)
        }
        try hub.removexattr(context(credentials), ino: ino, name: name)
    }

    // MARK: directories

    public func opendir(_ credentials: Credentials, ino: InodeID) throws -> UInt64 {
        let attributes = try hub.getattr(context(credentials), ino: ino)
        guard attributes.isDirectory else { throw WeftError.notDirectory }
        try hub.access(context(credentials), ino: ino, mask: 4)
        let handle = DirectoryHandle(ino: ino, context: context(credentials), attributes: attributes)
        lock.lock()
        defer { lock.unlock() }
        let id = nextHandle
        nextHandle += 1
        directoryHandles[id] = handle
        return id
    }

    /// Entries the agent asks the home for at a time.
    static let directoryPageEntries = 1024

    /// Entries from index `offset` on, at most `limit`; each entry's next offset is its index + 1.
    public func readdir(handle id: UInt64, offset: Int, limit: Int) throws -> [DirectoryEntry] {
        lock.lock()
        let handle = directoryHandles[id]
        lock.unlock()
        guard let handle else { throw WeftError(EBADF) }
        handle.lock.lock()
        defer { handle.lock.unlock() }
        if offset == 0 && !handle.entries.isEmpty {
            handle.entries.removeAll()   // rewinddir: start over and see changes
            handle.complete = false
        }
        while !handle.complete && handle.entries.count < offset + limit {
            let after = handle.entries.last?.name
            let page: [DirectoryEntry]
            do {
                page = try hub.readdir(handle.context, ino: handle.ino, after: after, limit: Self.directoryPageEntries)
            } catch let error as WeftError where error.errno == ENOENT {
                // Removed while open: it lists no (more) entries, as on a local file system.
                // (A live directory whose parent is missing, metadata damage, still fails.)
                guard (try? hub.getattr(handle.context, ino: handle.ino)) == nil else { throw error }
                handle.complete = true
                break
            }
            // A short page is the end: a directory of fewer entries is listed from one read at
            // the home, one instant of it, not pages from before and after a change.
            if page.count < Self.directoryPageEntries { handle.complete = true }
            handle.entries.append(contentsOf: page)
        }
        guard offset < handle.entries.count else { return [] }
        // readdirplus attributes update the kernel's inodes: show this agent's buffered writes.
        return handle.entries[offset..<min(handle.entries.count, offset + limit)].map { entry in
            var entry = entry
            if entry.attributes.isRegular { entry.attributes = localView(entry.attributes) }
            return entry
        }
    }

    public func releasedir(handle id: UInt64) {
        lock.lock()
        if let ino = directoryHandles.removeValue(forKey: id)?.ino,
           changedRemovedDirectories[ino] != nil, !directoryHandles.values.contains(where: { $0.ino == ino }) {
            changedRemovedDirectories[ino] = nil
        }
        lock.unlock()
    }

    // MARK: files

    func openFile(_ ino: InodeID) -> OpenFile? {
        lock.lock()
        defer { lock.unlock() }
        return files[ino]
    }

    /// Registers a handle; returns its id and whether the kernel may keep its page cache.
    private func register(_ attributes: Attributes, flags: Int32, context: RequestContext) -> (UInt64, Bool) {
        lock.lock()
        let file: OpenFile
        if let existing = files[attributes.ino] {
            file = existing
        } else {
            file = OpenFile(attributes: attributes, writeLeased: !leasesEnabled, ownChanges: ownChanges)
            files[attributes.ino] = file
        }
        file.handles += 1
        let id = nextHandle
        nextHandle += 1
        fileHandles[id] = FileHandle(file: file, flags: flags, context: context)
        lock.unlock()
        file.lock.lock()
        defer { file.lock.unlock() }
        file.adopt(attributes)
        let keepCache = file.kernelCacheVersion == attributes.dataVersion && attributes.dataVersion != 0
        file.kernelCacheVersion = attributes.dataVersion
        return (id, keepCache)
    }


    /// A read-only open of a file whose attributes this agent holds under a lease: no call to
    /// the home (the kernel checked the permission against leased attributes).
    private func openLocally(_ ino: InodeID, flags: Int32, context: RequestContext) -> (UInt64, Bool)? {
        guard leasesEnabled, flags & O_ACCMODE == O_RDONLY, flags & O_TRUNC == 0 else { return nil }
        lock.lock()
        guard let file = files[ino] else {
            lock.unlock()
            return nil
        }
        let handle = FileHandle(file: file, flags: flags, context: context)
        let fresh: Bool = file.leaseLock.withLock {
            guard file.freshGeneration == file.effectiveGeneration else { return false }
            handle.registered = false
            file.localHandles.append(handle)
            return true
        }
        guard fresh else {
            lock.unlock()
            return nil
        }
        filesWithLocalOpens.insert(ino)
        file.handles += 1
        let id = nextHandle
        nextHandle += 1
        fileHandles[id] = handle
        lock.unlock()
        file.lock.lock()
        defer { file.lock.unlock() }
        let keepCache = file.kernelCacheVersion == file.attributes.dataVersion && file.attributes.dataVersion != 0
        return (id, keepCache)
    }

    public func open(_ credentials: Credentials, ino: InodeID, flags: Int32) throws -> (handle: UInt64, keepCache: Bool) {
        if let local = openLocally(ino, flags: flags, context: context(credentials)) { return local }
        if flags & O_TRUNC != 0, let file = openFile(ino) {
            // Buffered writes of other handles happened before this truncate.
            file.lock.lock()
            defer { file.lock.unlock() }
            try flushLocked(file, context: context(credentials), durable: false)
        }
        let token = leaseCache.token()
        // The file as known before the call, its generation, and the own-change count: a
        // recall, notice or own change (an unlink or rename here) during the call moves one of
        // them, and then what the call brought is not kept as fresh.
        let known = openFile(ino)
        let knownGeneration = known?.currentGeneration
        let ownBefore = ownChanges.value
        let reads = flags & O_ACCMODE != O_WRONLY && flags & O_TRUNC == 0
        let opened = reads
            ? try hub.openLayout(context(credentials), ino: ino, flags: flags, chunkCount: Self.layoutBatch,
                                 dataMaxBytes: known.map(hasCachedObject) == true ? 0 : UInt32(Limits.openLayoutDataMaxBytes))
            : OpenedLayout(attributes: try hub.open(context(credentials), ino: ino, flags: flags), chunks: [], data: [])
        let attributes = opened.attributes
        if attributes.isDirectory { throw WeftError.isDirectory }   // registered nothing at the hub
        let (handle, keepCache) = register(attributes, flags: flags, context: context(credentials))
        let file = try fileHandle(handle).file
        // The same file at the same generation, or one first known here (it starts fresh at the
        // own-change count) with no own change since the call began.
        let generation = file.currentGeneration
        let unchanged = file === known ? generation == knownGeneration
                                       : ownChanges.value == ownBefore && generation == ownBefore
        if !unchanged { file.invalidate() }
        let cacheable = try leased(handle, flags: flags, since: token)
        if unchanged && cacheable && !opened.chunks.isEmpty {
            keepLayouts(opened.chunks, of: file, fetchedWith: attributes, since: generation)
        }
        cacheObject(of: opened)
        return (handle, keepCache && cacheable)
    }

    /// Whether `file`'s kept layout makes it one whole object whose only block is cached: then
    /// an open asks for no bytes (they would be sent only to be dropped).
    func hasCachedObject(_ file: OpenFile) -> Bool {
        let object: Slice? = file.lock.withLock {
            OpenedLayout.wholeObject(size: file.attributes.size, chunks: (0..<Self.layoutBatch).map { file.layouts[$0] ?? [] })
        }
        guard let object, Int(object.objectLength) <= Limits.blockSizeBytes else { return false }
        return cache.get(BlockCache.Key(object: object.id, block: 0)) != nil
    }

    /// Puts the bytes of a small file's object that an `openLayout` brought in the block cache,
    /// unless they are there or being fetched. Objects never change, so this needs no lease:
    /// whichever layout names the object later reads these bytes.
    func cacheObject(of opened: OpenedLayout) {
        guard !opened.data.isEmpty, opened.data.count <= Limits.blockSizeBytes,
              let object = OpenedLayout.wholeObject(size: opened.attributes.size, chunks: opened.chunks),
              Int(object.objectLength) == opened.data.count else { return }
        let slab = Slab(capacity: opened.data.count, pool: cache.slabs)
        opened.data.withUnsafeBytes { slab.pointer.copyMemory(from: $0.baseAddress!, byteCount: $0.count) }
        cache.offer(BlockCache.Key(object: object.id, block: 0),
                    CachedBlock(slab: slab, offset: 0, length: opened.data.count))
    }

    /// Keeps the chunk lists an open brought (chunks from 0 on), as a `layout` call's
    /// (`Reader.layoutLocked`), and marks the file fresh: only if the file's generation is still
    /// `snapshot`, which the caller checked against the one before the call (no recall, notice
    /// or own change since; it also checked the lease cache's token, which sees recalls,
    /// notices and own changes of the inode that came before the file was known), nothing newer
    /// was adopted meanwhile and nothing is buffered.
    func keepLayouts(_ lists: [[Slice]], of file: OpenFile, fetchedWith attributes: Attributes, since snapshot: UInt64) {
        file.lock.lock()
        defer { file.lock.unlock() }
        guard file.currentGeneration == snapshot, file.attributes.dataVersion == attributes.dataVersion,
              !file.hasDirtyData else { return }
        if !file.isFresh { file.layouts.removeAll() }
        for (index, list) in lists.enumerated() where file.layouts[UInt32(index)] == nil {
            file.layouts[UInt32(index)] = list
        }
        file.markFresh(since: snapshot)
    }

    /// After an open: marks the file's attributes stale if a recall overtook the reply, and
    /// takes the write lease for a writer. Returns whether the reply was covered by a lease.
    private func leased(_ handle: UInt64, flags: Int32, since token: UInt64) throws -> Bool {
        guard leasesEnabled else { return true }
        let file = try fileHandle(handle).file
        let cacheable = leaseCache.mayCache(kernelIno(file.ino), since: token)
        if !cacheable { file.invalidate() }
        let accessMode = flags & O_ACCMODE
        if (accessMode == O_WRONLY || accessMode == O_RDWR) && !file.isWriteLeased {
            let generation = file.currentGeneration
            do {
                let granted = try hub.acquireWriteLease(context(.root), ino: file.ino)
                file.leaseLock.withLock { if file.effectiveGeneration == generation { file.writeLeased = granted } }
            } catch {
                try? release(handle: handle)
                throw error
            }
        }
        return cacheable
    }

    @inline(__always) func kernelIno(_ ino: InodeID) -> UInt64 { kernelInoBase | ino }

    public func create(_ credentials: Credentials, parent: InodeID, name: [UInt8], mode: UInt32, umask: UInt32,
                       flags: Int32) throws -> (attributes: Attributes, handle: UInt64) {
        let token = leaseCache.token()
        let (epoch, namesSnapshot) = lock.withLock { (directoriesEpoch, namesEpoch) }
        let accessMode = flags & O_ACCMODE
        let created: CreatedFile
        do {
            // One call: create, open (the creator may open a new file whatever mode it was
            // given) and, for a writer, the write lease; the parent's new attributes come back.
            created = try hub.createOpen(context(credentials), parent: parent, name: name, mode: mode, umask: umask,
                                         flags: flags, writeLease: leasesEnabled && accessMode != O_RDONLY)
        } catch let error as WeftError where error.errno == EEXIST && flags & O_EXCL == 0 {
            defer { changedHere(parent) }
            lock.withLock { complete.forget(parent) }   // it said the name was missing
            let existing = try hub.lookup(context(credentials), parent: parent, name: name)
            if existing.isDirectory { throw WeftError.isDirectory }
            gaveEntry(existing.ino, parent, name)
            let attributes = try hub.open(context(credentials), ino: existing.ino, flags: flags)
            let (handle, _) = register(attributes, flags: flags, context: context(credentials))
            _ = try leased(handle, flags: flags, since: token)
            return (attributes, handle)
        } catch {
            lock.withLock { complete.forget(parent) }   // a failed call may still have been applied
            changedHere(parent)
            throw error
        }
        entriesChanged(parent, added: name)
        gaveEntry(created.attributes.ino, parent, name)
        if let parentAfter = created.parent {
            changedHere(parent, keeping: parentAfter, fetchedAt: epoch, token: token)
        } else {
            changedHere(parent)
        }
        if leasesEnabled && leaseCache.mayCache(kernelIno(parent), since: token) {
            // The reply granted a lease on the directory: the new name is known, as a lookup would.
            lock.withLock {
                guard namesEpoch == namesSnapshot else { return }
                if names.count >= Self.namesMax { names.removeAll(keepingCapacity: true) }
                names[NameKey(parent: parent, name: name)] = (created.attributes.ino, token)
            }
        }
        let (handle, _) = register(created.attributes, flags: flags, context: context(credentials))
        let file = try fileHandle(handle).file
        let generation = file.currentGeneration
        if leasesEnabled && !leaseCache.mayCache(kernelIno(file.ino), since: token) {
            // A recall of the new file overtook the reply (another agent opened it at once):
            // nothing the reply granted is held any more.
            file.invalidate()
        } else {
            if created.writeLeased {
                // Unless a recall (which revokes) came in since the check above.
                file.leaseLock.withLock { if file.effectiveGeneration == generation { file.writeLeased = true } }
            }
            if leasesEnabled { file.markCreatedBare(since: generation) }   // no xattrs yet
        }
        return (created.attributes, handle)
    }
}

/// A directory entry: the directory and a name in it.
struct NameKey: Hashable {
    var parent: InodeID
    var name: [UInt8]
}
