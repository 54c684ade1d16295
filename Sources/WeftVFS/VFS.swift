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
    /// Closed files kept under a lease, oldest first (see `closedFilesMax`).
    var closedFiles: [InodeID] = []
    /// Names of regular files looked up under their directory's lease, with the lease token of
    /// the lookup; valid while no recall of the directory came since.
    var names: [NameKey: (ino: InodeID, token: UInt64)] = [:]
    static let namesMax = 65_536
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
    var nextHandle: UInt64 = 1
    var sliceIDs: (next: SliceID, end: SliceID) = (0, 0)
    /// Whether the hub takes `discardUploads` (false after its first ENOSYS).
    let hubDiscards = Atomic<Bool>(true)
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
        try? hub.closeSession(session)
    }

    // MARK: namespace

    public func lookup(_ credentials: Credentials, parent: InodeID, name: [UInt8]) throws -> Attributes {
        let key = NameKey(parent: parent, name: name)
        // A name this agent looked up under the directory's lease, of a file it holds under a
        // lease: no call to the home.
        if leasesEnabled, let known = lock.withLock({ names[key] }),
           leaseCache.mayCache(kernelIno(parent), since: known.token),
           let file = openFile(known.ino), file.isFresh {
            file.lock.lock()
            defer { file.lock.unlock() }
            return file.visibleAttributes
        }
        // A name missing from a directory whose every name is known: no call either.
        if knownAbsent(parent, name) { throw WeftError(ENOENT) }
        let token = leaseCache.token()
        let epoch = lock.withLock { namesEpoch }
        let attributes = try hub.lookup(context(credentials), parent: parent, name: name)
        if leasesEnabled && attributes.isRegular && leaseCache.mayCache(kernelIno(parent), since: token) {
            lock.withLock {
                guard epoch == namesEpoch else { return }
                if names.count >= Self.namesMax { names.removeAll(keepingCapacity: true) }
                names[key] = (attributes.ino, token)
            }
        }
        return localView(attributes)
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
            return NamesChange(keys: keys, inodes: inodes, epoch: namesEpoch)
        }
    }

    /// After this agent's own unlink or rename of `change.keys`: forgets the names again, and
    /// marks stale the attributes it keeps of the files whose links or ctime changed. Only the
    /// files the names had, when they were known and no other own unlink or rename overlapped
    /// this one; otherwise every file (which one changed is not known here).
    func forgetNames(after change: NamesChange) {
        let alone: Bool = lock.withLock {
            let alone = namesEpoch == change.epoch
            namesEpoch &+= 1
            for key in change.keys { names[key] = nil }
            return alone
        }
        if alone, let inodes = change.inodes {
            for ino in inodes { openFile(ino)?.invalidate() }
        } else {
            invalidateFiles()
        }
    }

    /// What `forgetNames(before:)` saw.
    struct NamesChange {
        var keys: [NameKey]
        /// The files the names had; nil if any was unknown.
        var inodes: [InodeID]?
        var epoch: UInt64
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
        let epoch = lock.withLock { directoriesEpoch }
        let fresh = try hub.getattr(context(credentials), ino: ino)
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
        return try hub.setattr(context(credentials), ino: ino, changes)
    }

    public func mkdir(_ credentials: Credentials, parent: InodeID, name: [UInt8], mode: UInt32, umask: UInt32) throws -> Attributes {
        defer { changedHere(parent) }
        let token = leaseCache.token()
        let made = try changingEntries(of: parent) {
            try hub.mkdir(context(credentials), parent: parent, name: name, mode: mode, umask: umask)
        }
        entriesChanged(parent, added: name)
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
        openFile(ino)?.invalidate()   // its link count and ctime changed (this agent is not recalled)
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
    }

    public func access(_ credentials: Credentials, ino: InodeID, mask: UInt32) throws {
        try hub.access(context(credentials), ino: ino, mask: mask)
    }

    public func statfs(_ credentials: Credentials) throws -> FileSystemStats {
        try hub.statfs(context(credentials))
    }

    public func getxattr(_ credentials: Credentials, ino: InodeID, name: [UInt8]) throws -> [UInt8] {
        try hub.getxattr(context(credentials), ino: ino, name: name)
    }

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
        let handle = DirectoryHandle(ino: ino, context: context(credentials))
        lock.lock()
        defer { lock.unlock() }
        let id = nextHandle
        nextHandle += 1
        directoryHandles[id] = handle
        return id
    }

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
            let page = try hub.readdir(handle.context, ino: handle.ino, after: after, limit: 1024)
            if page.isEmpty { handle.complete = true }
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
        directoryHandles[id] = nil
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

    /// Files kept after their last close while a lease covers them (their attributes and layouts
    /// serve the next open), oldest first; at most `closedFilesMax`.
    static let closedFilesMax = 4096

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
        let attributes = try hub.open(context(credentials), ino: ino, flags: flags)
        if attributes.isDirectory { throw WeftError.isDirectory }
        let (handle, keepCache) = register(attributes, flags: flags, context: context(credentials))
        let cacheable = try leased(handle, flags: flags, since: token)
        return (handle, keepCache && cacheable)
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
        } else if created.writeLeased {
            // Unless a recall (which revokes) came in since the check above.
            file.leaseLock.withLock { if file.effectiveGeneration == generation { file.writeLeased = true } }
        }
        return (created.attributes, handle)
    }

    func fileHandle(_ id: UInt64) throws -> FileHandle {
        lock.lock()
        defer { lock.unlock() }
        guard let handle = fileHandles[id] else { throw WeftError(EBADF) }
        return handle
    }

    public func write(handle id: UInt64, offset: UInt64, data: UnsafeRawBufferPointer) throws -> Int {
        let handle = try fileHandle(id)
        let accessMode = handle.flags & O_ACCMODE
        guard accessMode == O_WRONLY || accessMode == O_RDWR else { throw WeftError(EBADF) }
        if data.isEmpty { return 0 }
        try budget.reserve(data.count) { try self.flushSomeFile() }
        let file = handle.file
        file.lock.lock()
        defer { file.lock.unlock() }
        let position = handle.flags & O_APPEND != 0 ? file.visibleAttributes.size : offset
        guard position + UInt64(data.count) <= Limits.fileSizeMaxBytes else {
            budget.release(data.count)
            throw WeftError.fileTooBig
        }
        // Without the write lease another node may read this file now: write through. Earlier
        // buffered writes commit first; if this write's commit then fails, its bytes are
        // dropped, so that a write() that failed has no effect later (SPEC.md §7).
        if !file.isWriteLeased {
            if file.hasDirtyData {
                do { try flushLocked(file, context: handle.context, durable: false) } catch {
                    budget.release(data.count)
                    throw error
                }
            }
            file.buffer(data, at: position, chunkSizeBytes: chunkSizeBytes, pool: pool)
            do { try flushLocked(file, context: handle.context, durable: false) } catch {
                if file.hasDirtyData { clearBuffers(file) }
                throw error
            }
            return data.count
        }
        file.buffer(data, at: position, chunkSizeBytes: chunkSizeBytes, pool: pool)
        logger.trace("write \(file.ino) at \(position) +\(data.count): dirty end \(file.dirtyEnd)")
        let chunkSize = UInt64(chunkSizeBytes)
        for index in UInt32(position / chunkSize)...UInt32((position + UInt64(data.count) - 1) / chunkSize) {
            if let chunk = file.stageIfFull(index, chunkSizeBytes: chunkSizeBytes) {
                startUpload(chunk, of: file, context: handle.context)
            }
        }
        commitUploadedPrefix(file, context: handle.context)
        return data.count
    }

    /// Uploaded staged chunks at the front of a file's list that make a commit of their own.
    static let stagedCommitBatch = 4

    /// Commits the staged chunks at the front of `file`'s list whose uploads ended, once there
    /// are `stagedCommitBatch` of them: a long write publishes its progress and frees their
    /// buffers without waiting for the file's next commit. Everything staged or buffered after
    /// them is newer, so committing them first keeps the slice order. A failure is left to the
    /// next commit. Caller holds `file.lock`.
    func commitUploadedPrefix(_ file: OpenFile, context: RequestContext) {
        let ready = file.staged.prefix { $0.uploaded != nil }
        guard ready.count >= Self.stagedCommitBatch else { return }
        let commits = ready.flatMap { $0.uploaded! }
        let chunkSize = UInt64(chunkSizeBytes)
        let end = commits.map { UInt64($0.chunkIndex) * chunkSize + UInt64($0.slice.offsetInChunk) + UInt64($0.slice.length) }
            .max() ?? 0
        do {
            try commit(commits, of: file, minimumSize: end, durable: false, context: context)
            let bytes = ready.reduce(0) { $0 + giveBack($1.extents) }
            file.staged.removeFirst(ready.count)
            file.dirtyBytes -= bytes
            budget.release(bytes)
            if !file.hasDirtyData { file.dirtyEnd = 0 }
        } catch {
            // The objects are gone (the hub restarted): the next commit uploads them again.
            if (error as? WeftError)?.errno == ESTALE { ready.forEach { $0.uploaded = nil } }
            logger.debug("commit of inode \(file.ino)'s uploaded chunks failed, the next commit retries: \(error)")
        }
    }

    /// Uploads a staged chunk in the background (SPEC.md §7, Write-behind); the file's next
    /// commit waits for it and commits its slices, or uploads it again if it failed.
    func startUpload(_ chunk: StagedChunk, of file: OpenFile, context: RequestContext) {
        Self.uploadPool.async { [self] in
            var slices: [SliceCommit]?
            var written: [SliceID] = []
            do {
                slices = try upload(chunk.extents, of: chunk.index, context: context, written: &written)
            } catch {
                discard(written, context: context)
                logger.debug("background upload of inode \(file.ino) chunk \(chunk.index) failed, the commit retries: \(error)")
            }
            file.lock.lock()
            file.uploadEnded(chunk, slices: slices)
            file.lock.unlock()
        }
    }

    /// Background uploads of full chunks, shared by every VFS of the process.
    static let uploadPool = WorkerPool(name: "weft-upload", threads: 4)

    /// Commits the handle's file (close(2) and flush).
    public func flush(handle id: UInt64) throws {
        let handle = try fileHandle(id)
        handle.file.lock.lock()
        defer { handle.file.lock.unlock() }
        try flushLocked(handle.file, context: handle.context, durable: false)
    }

    /// Commits the file and makes it durable on the hub.
    public func fsync(handle id: UInt64) throws {
        let handle = try fileHandle(id)
        handle.file.lock.lock()
        defer { handle.file.lock.unlock() }
        try flushLocked(handle.file, context: handle.context, durable: true)
    }

    public func release(handle id: UInt64) throws {
        lock.lock()
        let handle = fileHandles.removeValue(forKey: id)
        lock.unlock()
        guard let handle else { throw WeftError(EBADF) }
        let file = handle.file
        logger.trace("release handle \(id) of \(file.ino)")
        file.lock.lock()
        var failure: Error?
        do { try flushLocked(file, context: handle.context, durable: false) } catch { failure = error }
        file.lock.unlock()
        let registered: Bool = file.leaseLock.withLock {
            if !handle.registered { file.localHandles.removeAll { $0 === handle } }
            return handle.registered
        }
        lock.lock()
        if !registered && file.leaseLock.withLock({ file.localHandles.isEmpty }) {
            filesWithLocalOpens.remove(file.ino)
        }
        file.handles -= 1
        if file.handles == 0 && !file.hasDirtyData {
            if leasesEnabled && file.isFresh {
                // Keep what the lease covers for the next open; forget the oldest beyond the bound.
                closedFiles.append(file.ino)
                while closedFiles.count > Self.closedFilesMax {
                    let oldest = closedFiles.removeFirst()
                    if let old = files[oldest], old.handles == 0, !old.hasDirtyData { files[oldest] = nil }
                }
            } else {
                files[file.ino] = nil
            }
        }
        lock.unlock()
        if registered { try hub.release(handle.context, ino: file.ino) }
        if let failure { throw failure }
    }

    // MARK: commit

    func nextSliceID(_ context: RequestContext) throws -> SliceID {
        lock.lock()
        if sliceIDs.next < sliceIDs.end {
            defer { sliceIDs.next += 1; lock.unlock() }
            return sliceIDs.next
        }
        lock.unlock()
        let first = try hub.allocateSliceIDs(context, count: sliceIDBatch)
        lock.lock()
        defer { lock.unlock() }
        sliceIDs = (first + 1, first + SliceID(sliceIDBatch))
        return first
    }

    /// Uploads the file's buffered extents as new chunk objects and commits them, after its
    /// staged chunks, in one change. Caller holds `file.lock`. On failure the buffers are kept,
    /// so nothing is lost, and the objects the attempt wrote are discarded unless its commit may
    /// have been applied; a file found gone (unlinked and closed everywhere) drops its buffers
    /// and throws ESTALE (SPEC.md §9.1).
    func flushLocked(_ file: OpenFile, context: RequestContext, durable: Bool) throws {
        guard file.hasDirtyData else {
            if durable { try hub.sync(context) }
            return
        }
        file.waitForUploads()
        var attempt = 0
        while true {
            attempt += 1
            var commits: [SliceCommit] = []
            // Objects of this attempt that nothing keeps if it fails: staged chunks keep theirs
            // for the next attempt, buffered extents are uploaded anew each time.
            var written: [SliceID] = []
            do {
                for chunk in file.staged {
                    if chunk.uploaded == nil {
                        var chunkWritten: [SliceID] = []
                        do {
                            chunk.uploaded = try upload(chunk.extents, of: chunk.index, context: context,
                                                        written: &chunkWritten)
                        } catch {
                            written += chunkWritten
                            throw error
                        }
                    }
                    commits += chunk.uploaded!
                }
                for index in file.dirty.keys.sorted() {
                    commits += try upload(file.dirty[index]!, of: index, context: context, written: &written)
                }
            } catch {
                // Nothing was committed: what this attempt wrote is garbage.
                discard(written, context: context)
                try failed(file, error, context: context)
            }
            do {
                try commit(commits, of: file, minimumSize: file.dirtyEnd, durable: durable, context: context)
                clearBuffers(file)
                return
            } catch let error as WeftError where error.errno == ESTALE && attempt == 1 && !isGone(file, context: context) {
                // The hub lost the objects (it restarted before the commit): write them again.
                logger.warning("re-uploading inode \(file.ino) data: \(error.message)")
                discard(written + file.staged.flatMap { $0.uploaded ?? [] }.map(\.slice.id), context: context)
                for chunk in file.staged { chunk.uploaded = nil }
                continue
            } catch {
                if !Self.commitMayHaveApplied(error) { discard(written, context: context) }
                try failed(file, error, context: context)
            }
        }
    }

    /// After a failed upload or commit of `file`'s buffered writes: drops them if the file is
    /// gone (then throws ESTALE), else counts the failure for the background back-off and
    /// rethrows `error`. Caller holds `file.lock`.
    private func failed(_ file: OpenFile, _ error: Error, context: RequestContext) throws -> Never {
        if isGone(file, context: context) {
            dropBuffers(file, context: context)
            throw WeftError(ESTALE, "inode \(file.ino) no longer exists; its buffered writes were dropped")
        }
        noteCommitFailure(file)
        throw error
    }

    /// Commits uploaded slices of `file` at the hub and adopts the attributes it returns.
    /// Caller holds `file.lock`.
    func commit(_ commits: [SliceCommit], of file: OpenFile, minimumSize: UInt64, durable: Bool,
                context: RequestContext) throws {
        let before = file.attributes.dataVersion
        let attributes = try hub.commitSlices(context, ino: file.ino, slices: commits, minimumSize: minimumSize,
                                              durable: durable)
        if file.kernelCacheVersion == before { file.kernelCacheVersion = attributes.dataVersion }
        file.layouts.removeAll()
        file.attributes = attributes
    }

    /// Returns committed extents' buffers to the pool; their bytes.
    func giveBack(_ extents: [Extent]) -> Int {
        extents.reduce(0) { bytes, extent in
            let count = extent.buffer.count
            pool.give(extent.buffer)
            return bytes + count
        }
    }

    /// Drops a file's committed extents, staged ones included, returning pooled buffers. No
    /// upload of the file may be running.
    func recycle(_ file: OpenFile) {
        precondition(file.uploadsRunning == 0, "recycling buffers an upload still reads")
        for extents in file.dirty.values { _ = giveBack(extents) }
        for chunk in file.staged { _ = giveBack(chunk.extents) }
        file.dirty.removeAll()
        file.staged.removeAll()
    }

    /// Frees write-buffer space by committing the file with the most buffered data.
    func flushSomeFile() throws {
        lock.lock()
        let victim = files.values.max { $0.dirtyBytes < $1.dirtyBytes }
        lock.unlock()
        guard let victim else { return }
        victim.lock.lock()
        defer { victim.lock.unlock() }
        do {
            try flushLocked(victim, context: context(.root), durable: false)
        } catch let error as WeftError where error.errno == ESTALE && !victim.hasDirtyData {
            // The victim no longer exists and its buffers were dropped: the space is free.
            logger.debug("dropped the buffered writes of inode \(victim.ino): \(error.message)")
        }
    }

    /// Commits every file's buffered writes.
    public func flushAll(durable: Bool) throws {
        lock.lock()
        let all = Array(files.values)
        lock.unlock()
        var failure: Error?
        for file in all {
            file.lock.lock()
            do { try flushLocked(file, context: context(.root), durable: false) } catch { failure = error }
            file.lock.unlock()
        }
        if durable { try hub.sync(context(.root)) }
        if let failure { throw failure }
    }
}

/// Bounds the bytes of buffered writes. A writer over the bound first frees space by committing
/// buffered data (backpressure), so memory never exceeds the bound.
final class DirtyBudget: @unchecked Sendable {
    private let condition = NSCondition()
    private var usedBytes = 0
    let limitBytes: Int

    init(limitBytes: Int) {
        self.limitBytes = limitBytes
    }

    func reserve(_ bytes: Int, makeRoom: () throws -> Void) throws {
        var attempts = 0
        while true {
            condition.lock()
            if usedBytes + bytes <= limitBytes || usedBytes == 0 {
                usedBytes += bytes
                condition.unlock()
                return
            }
            condition.unlock()
            attempts += 1
            if attempts > 1000 { throw WeftError(ENOBUFS, "write buffer stays full") }
            try makeRoom()
        }
    }

    func release(_ bytes: Int) {
        condition.lock()
        usedBytes -= bytes
        precondition(usedBytes >= 0, "write buffer accounting went negative")
        condition.broadcast()
        condition.unlock()
    }

    var used: Int {
        condition.lock()
        defer { condition.unlock() }
        return usedBytes
    }
}

// MARK: Leases (SPEC.md §12.6)

extension VFS: LeaseClient {
    /// A recall from the home: commit the file's buffered writes if it was write-leased, drop
    /// its cached attributes and layouts, and invalidate the kernel's attributes, pages and the
    /// named entries. Never waits for a thread that holds the file's `lock` unless this agent
    /// held the write lease (whose holder's own commits never wait for recalls).
    public func recall(_ ino: InodeID, names: [[UInt8]], notice: Bool, deadlineNs: UInt64) -> Bool {
        let kernel = kernelIno(ino)
        leaseCache.recalled(kernel)
        let file = openFile(ino)
        if notice {
            file?.invalidate()
            return true
        }
        // Opens served locally become known to the home before the change (an unlink must keep
        // the file while it is open).
        if let file { registerLocalOpens(of: file) }
        if let file, file.revoke() {
            file.lock.lock()
            do {
                try flushLocked(file, context: context(.root), durable: false)
            } catch {
                logger.warning("recall of inode \(ino): commit of buffered writes failed, will retry: \(error)")
            }
            file.layouts.removeAll()
            file.lock.unlock()
        }
        leaseCache.invalidateInode?(kernel)
        if !names.isEmpty { expireEntries(kernel, names) }
        return true
    }

    /// How long a recall waits for the kernel to drop a directory's entries before it makes
    /// every entry of the mount stale instead.
    static let entryExpiryWaitMs = 10

    /// Makes the kernel look `names` of directory `kernel` up again before it answers a recall.
    ///
    /// The kernel takes the directory's lock for that, and holds it during this agent's own
    /// create, unlink or rename in the directory, whose call may be waiting at the home for
    /// another agent's answer to a recall, while that agent's kernel holds its directory's lock
    /// the same way: waiting for the lock made both wait until one call timed out. So the names
    /// are dropped on a thread of their own, and when that takes longer than
    /// `entryExpiryWaitMs`, every entry of the mount is made stale at once, which takes no
    /// lock; a lookup then asks again (and waits for the directory's lock, as it must). A kernel
    /// before Linux 6.16 cannot; there the recall waits for the lock (SPEC.md §12.6).
    func expireEntries(_ kernel: UInt64, _ names: [[UInt8]]) {
        guard let invalidateEntry = leaseCache.invalidateEntry else { return }
        let done = DispatchSemaphore(value: 0)
        WorkerPool.detach {
            for name in names { invalidateEntry(kernel, name) }
            done.signal()
            // The kernel may still be installing an entry from a reply that left before the
            // recall arrived: drop the names once more shortly after.
            usleep(20_000)
            for name in names { invalidateEntry(kernel, name) }
        }
        guard done.wait(timeout: .now() + .milliseconds(Self.entryExpiryWaitMs)) == .timedOut else { return }
        if leaseCache.expireAllEntries?() == true {
            leaseCache.expiredWhole()
            logger.debug("recall of directory \(kernel): its lock is held, every kernel entry made stale")
        } else {
            done.wait()
        }
    }

    public var lastHeardNs: UInt64 { Leases.nowNs() }

    /// Registers at the home the opens of `file` served locally under its lease.
    func registerLocalOpens(of file: OpenFile) {
        let local: [FileHandle] = file.leaseLock.withLock {
            let handles = file.localHandles
            file.localHandles.removeAll()
            for handle in handles { handle.registered = true }
            return handles
        }
        for handle in local {
            do {
                _ = try hub.open(handle.context, ino: file.ino, flags: handle.flags)
            } catch {
                logger.warning("inode \(file.ino): could not register a local open at the home: \(error)")
            }
        }
    }

    /// After this agent's own unlink or rename: the attributes it keeps of its files may be stale
    /// (its own changes recall nothing of its own), so they are fetched again when next used.
    /// O(1): it bumps the count every file's freshness includes.
    func invalidateFiles() {
        ownChanges.bump()
    }

    /// Before this agent's own unlink or rename (which may remove a file it has open, and which
    /// recalls nothing of its own): registers every local open at the home. Scans only the files
    /// with local opens, not every file kept.
    func registerLocalOpens() {
        lock.lock()
        var withLocal: [OpenFile] = []
        var gone: [InodeID] = []
        for ino in filesWithLocalOpens {
            if let file = files[ino], file.leaseLock.withLock({ !file.localHandles.isEmpty }) {
                withLocal.append(file)
            } else {
                gone.append(ino)
            }
        }
        for ino in gone { filesWithLocalOpens.remove(ino) }
        lock.unlock()
        for file in withLocal { registerLocalOpens(of: file) }
    }

    /// Every lease of this volume is void: drop what the leases covered. Cached attributes and
    /// entries in the kernel expire by their own 1 s timeouts; pages of open files are dropped
    /// (in the background: this runs on the connection's thread and must not block). Write
    /// leases are marked for reclaim on the next connection.
    public func leasesLost() {
        leaseCache.lost()
        lock.lock()
        let open = Array(files.values)
        lock.unlock()
        for file in open where file.revoke() {
            file.leaseLock.withLock { file.reclaim = true }
        }
        guard !open.isEmpty else { return }
        logger.warning("leases lost (hub silent or reconnected): dropping the caches of \(open.count) open file(s)")
        let kernel = open.map { kernelIno($0.ino) }
        let cache = leaseCache
        DispatchQueue.global().async {
            for ino in kernel { cache.invalidateInode?(ino) }
        }
    }

    public func reclaimableWriteLeases() -> [InodeID] {
        lock.lock()
        let open = Array(files.values)
        lock.unlock()
        return open.filter { file in file.leaseLock.withLock { file.reclaim } }.map(\.ino)
    }

    public func writeLeaseReclaimed(_ ino: InodeID, granted: Bool) {
        guard let file = openFile(ino) else { return }
        file.leaseLock.withLock {
            file.reclaim = false
            if granted { file.writeLeased = true }
        }
        logger.info("write lease on inode \(ino) \(granted ? "reclaimed" : "not reclaimed: buffered writes go through")")
    }

    /// The agent lives in the hub's process when it reaches a `Hub` directly.
    public var survivesHubRestart: Bool { false }

    /// A token to take before a call whose reply the kernel may cache (`mayCache`).
    public func cacheToken() -> UInt64 { leaseCache.token() }

    /// Whether the kernel may cache a reply about kernel inode `ino` to a call begun at `token`.
    public func mayCache(_ ino: InodeID, since token: UInt64) -> Bool {
        !leasesEnabled || leaseCache.mayCache(ino, since: token)
    }
}

/// A directory entry: the directory and a name in it.
struct NameKey: Hashable {
    var parent: InodeID
    var name: [UInt8]
}
