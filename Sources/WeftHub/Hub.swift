import Foundation
import Logging
import Synchronization
import WeftChunks
import WeftMeta
import WeftProto

/// The in-process hub: the `HubAPI` over one volume's metadata engine and chunk store.
///
/// Used directly by an embedded mount and by tests, and served to remote agents by `weftd`
/// through `WeftNet.HubServer`. A hub directory holds `meta/` (RocksDB) and `chunks/`.
public final class Hub: HubAPI, @unchecked Sendable {
    public let directory: String
    public let meta: MetaStore
    public let chunks: ChunkStore
    let logger: Logger
    let maintenance: Maintenance
    /// Objects each session has written and not yet committed (bounded by the agents' write
    /// buffers); deleted when the session ends without committing them.
    let pendingUploads = PendingUploads()
    private let adoptedObjects = Atomic<Int>(0)
    /// Sessions that handed over an object written into the store (`adoptObject`): when one
    /// ends, files its agent left in flight are swept (SPEC.md §4, Co-located writes, Crashes).
    private let coLocatedWriters = Mutex<Set<SessionID>>([])
    let locks = LockTable()
    /// Who caches what, and the recalls before conflicting changes (SPEC.md §12.6).
    public let leases: LeaseTable
    /// Inodes removed a moment ago, for `getattr` (SPEC.md §12.6, "An inode gone under a name").
    let removed = RemovedInodes()
    /// Deletes garbage chunk objects held by another hub (by hub id); set by the fabric. Without
    /// it such objects stay listed as garbage.
    public var deleteAtHolder: (@Sendable (UInt16, [SliceID]) throws -> Void)? {
        get { holderDeleteLock.withLock { holderDelete } }
        set { holderDeleteLock.withLock { holderDelete = newValue } }
    }
    private let holderDeleteLock = NSLock()
    private var holderDelete: (@Sendable (UInt16, [SliceID]) throws -> Void)?

    /// Slice lists longer than this are compacted in the background.
    public static let compactionThresholdSlices = 16

    /// Orders the passes over the objects the journal carries (`syncJournaledObjects`) and
    /// fsck's rewrites of them (`rewriteCarried`): a rewrite must not land after a pass's sync
    /// that then drops its key.
    private let journalPassLock = NSLock()
    private let underfootLock = NSLock()
    private var underfoot = 0
    /// Changes of names made again because another change replaced what a name held between
    /// their lookup and their apply (`changingNames`; tests).
    public var namesChangedUnderfoot: Int { underfootLock.withLock { underfoot } }
    func countChangedUnderfoot() { underfootLock.withLock { underfoot += 1 } }
    private var beforeNamesApply: (() -> Void)?
    /// Test only: runs in a change of names after its recalls, just before it applies.
    public var testBeforeNamesApply: (() -> Void)? {
        get { underfootLock.withLock { beforeNamesApply } }
        set { underfootLock.withLock { beforeNamesApply = newValue } }
    }

    private var beforeCompactionSwap: ((SliceID) -> Void)?
    /// Test only: runs in a compaction with the new object's id, just before the swap.
    public var testBeforeCompactionSwap: ((SliceID) -> Void)? {
        get { underfootLock.withLock { beforeCompactionSwap } }
        set { underfootLock.withLock { beforeCompactionSwap = newValue } }
    }

    private var beforeCommitApply: ((InodeID) -> Void)?
    /// Test only: runs in `commitSlices` with the inode, after its checks, before it applies.
    public var testBeforeCommitApply: ((InodeID) -> Void)? {
        get { underfootLock.withLock { beforeCommitApply } }
        set { underfootLock.withLock { beforeCommitApply = newValue } }
    }

    private var beforeSync: (() -> Void)?
    /// Test only: runs at the start of `sync`.
    public var testBeforeSync: (() -> Void)? {
        get { underfootLock.withLock { beforeSync } }
        set { underfootLock.withLock { beforeSync = newValue } }
    }

    static func metaPath(_ directory: String) -> String { directory + "/meta" }
    static func chunkPath(_ directory: String) -> String { directory + "/chunks" }

    /// True if `directory` holds a formatted hub.
    public static func exists(at directory: String) -> Bool {
        FileManager.default.fileExists(atPath: metaPath(directory) + "/CURRENT")
    }

    /// Creates an empty hub in `directory`. Refuses an existing hub unless `force`.
    /// `firstSliceID` is 1 for a single hub; a cluster volume's ids start at `volumeID << 48 | 1`.
    public static func format(directory: String, chunkSizeBytes: Int, compression: Compression, force: Bool,
                              firstSliceID: UInt64 = 1) throws {
        guard chunkSizeBytes >= Limits.chunkSizeMinBytes, chunkSizeBytes <= Limits.chunkSizeMaxBytes,
              chunkSizeBytes % Limits.blockSizeBytes == 0 else {
            throw WeftError(EINVAL, "chunk size must be a multiple of \(Limits.blockSizeBytes) between "
                            + "\(Limits.chunkSizeMinBytes) and \(Limits.chunkSizeMaxBytes) bytes")
        }
        let files = FileManager.default
        if exists(at: directory) {
            guard force else { throw WeftError(EEXIST, "\(directory) already holds a Weft hub (use --force to erase it)") }
            if let socket = try? files.contentsOfDirectory(atPath: directory), socket.contains("hub.sock"),
               EmbeddedSocket.isServed(directory) {
                throw WeftError(EBUSY, "\(directory) is in use by a running mount or weftd")
            }
            try? files.removeItem(atPath: metaPath(directory))
            try? files.removeItem(atPath: chunkPath(directory))
        }
        try files.createDirectory(atPath: directory, withIntermediateDirectories: true)
        var uuid = [UInt8](repeating: 0, count: 16)
        for i in uuid.indices { uuid[i] = UInt8.random(in: 0...255) }
        let volume = VolumeInfo(formatVersion: 1, uuid: uuid, chunkSizeBytes: UInt32(chunkSizeBytes),
                                compression: compression, createdNs: currentTimeNs())
        try files.createDirectory(atPath: chunkPath(directory), withIntermediateDirectories: true)
        try MetaStore.format(path: metaPath(directory), volume: volume, firstSliceID: firstSliceID)
    }

    /// Opens the hub in `directory`. Call `recover()` before serving agents. `pageCacheReads`:
    /// object reads go through the page cache, so that agents reading the same objects share it
    /// (weftd, which serves agents over the network); otherwise the in-process agent's block
    /// cache keeps what it reads and reads bypass the page cache (SPEC.md §3.2, Direct I/O).
    /// `reserveBytes`: free disk space no chunk object may take, kept for metadata (SPEC.md
    /// §9.1); nil: `ChunkStore.defaultReserveBytes`. `readCacheBytes` above 0: stored-block
    /// spans sent to agents are kept in memory of that bound (SPEC.md §4, Hub read cache).
    public init(directory: String, durability: DurabilityMode = .strict, pageCacheReads: Bool = false,
                readCacheBytes: Int = 0, reserveBytes: UInt64? = nil, logger: Logger) throws {
        guard Hub.exists(at: directory) else {
            throw WeftError(ENOENT, "\(directory) holds no Weft hub (create one with `weft format`)")
        }
        self.directory = directory
        self.logger = logger
        // The chunk store opens first, with the volume's settings, so that the journal's replay
        // can look for the objects its changes added (SPEC.md §5, "Objects lost with unsynced
        // commits").
        var store: ChunkStore?
        meta = try MetaStore(path: Hub.metaPath(directory), durability: durability, logger: logger) { volume in
            let opened = try ChunkStore(directory: Hub.chunkPath(directory), compression: volume.compression,
                                        logger: logger, directReads: !pageCacheReads,
                                        spanCacheBytes: readCacheBytes)
            store = opened
            return { id in
                do {
                    _ = try opened.length(id: id)
                } catch let error as WeftError where error.errno == ENOENT {
                    return false
                } catch {
                    return true   // there but damaged, or not known: reads and fsck tell
                }
                return true
            }
        }
        guard let store else { throw WeftError(EIO, "the chunk store of \(directory) did not open") }
        chunks = store
        chunks.setReserve(reserveBytes ?? ChunkStore.defaultReserveBytes(directory: Hub.chunkPath(directory)))
        maintenance = Maintenance(logger: logger)
        leases = LeaseTable(logger: logger)
        leases.isRegularFile = { [meta] ino in (try? meta.getattr(ino))?.isRegular ?? false }
        if FileManager.default.fileExists(atPath: Hub.leaseMarkerPath(directory)) {
            // Remote agents held leases when this hub stopped without closing: they may still
            // cache, or hold writes buffered under write leases they will reclaim.
            leases.startGrace(Leases.periodNs)
            logger.notice("restarted after a crash while agents held leases: serving nothing but reclaims for \(Leases.periodNs / 1_000_000_000) s")
        }
        meta.beforeSync = { try store.sync() }
        maintenance.hub = self
        try restoreJournaledObjects()
    }

    /// At open: writes again every object whose bytes the journal carries and that a crash lost
    /// before it reached the disk, syncs the store, then deletes every `J` key, durably (SPEC.md
    /// §5, "Small objects in the journal"). Garbage objects are not written again.
    private func restoreJournaledObjects() throws {
        let objects = try meta.journaledObjects()
        guard !objects.isEmpty else { return }
        var restored = 0
        for object in objects where !object.isGarbage {
            do {
                if try chunks.restore(id: object.id, raw: object.bytes) { restored += 1 }
            } catch {
                throw WeftError(EIO, "cannot restore chunk object \(object.id) from the metadata journal: \(error)")
            }
        }
        // Objects that read back whole may still be only in the page cache (a killed process
        // left them there): every one is made durable before its key goes.
        try chunks.sync()
        try chunks.syncObjects(objects.filter { !$0.isGarbage }.map(\.id))
        try meta.forgetJournaled(objects.map(\.id), durable: true)
        try meta.sync()
        if restored > 0 {
            logger.notice("restored \(restored) chunk object(s) from the metadata journal (lost by a crash before they reached the disk)")
        }
    }

    /// Syncs the objects whose bytes the journal carries and deletes their `J` keys (the
    /// maintenance thread, at least once a second, and `close`). After a failed pass every
    /// object the journal carries is written again from its key, in place, before it is synced
    /// again: a failed writeback may have left its pages clean but unwritten, and once evicted
    /// they would read as damage while the key still holds the bytes (SPEC.md §5). One whose
    /// rewrite fails is tried again at the next call, and never synced (nor its key dropped)
    /// before.
    public func syncJournaledObjects() throws {
        journalPassLock.lock()
        defer { journalPassLock.unlock() }
        rewriteJournaled(chunks.takeRewriteNeeded())
        let synced: [SliceID]
        do {
            synced = try chunks.syncJournaled()
        } catch let failure as JournaledSyncFailure {
            rewriteJournaled(chunks.takeRewriteNeeded())
            throw failure.error
        }
        try meta.forgetJournaled(synced)
    }

    /// Writes the objects `ids` again from the keys that carry them, if they still do (fsck of
    /// damaged or missing objects, SPEC.md §11), with no pass running meanwhile: one that
    /// reads back whole goes back to the passes (its key goes once it is synced), one that
    /// does not waits as after a failed pass (`needRewrite`), its key kept. Returns the ids
    /// written, and the first error of each that was not.
    func rewriteCarried(_ ids: Set<SliceID>) throws -> (rewritten: [SliceID], failed: [(SliceID, Error)]) {
        journalPassLock.lock()
        defer { journalPassLock.unlock() }
        let carried = try meta.journaledObjects().filter { ids.contains($0.id) && !$0.isGarbage }
        chunks.takeJournaled(Set(carried.map(\.id)))
        return writeAgain(carried.sorted { $0.id < $1.id }, checked: true)
    }

    /// Writes each object again from the bytes its key carries (`checked`: and reads it back
    /// whole), gives those written back to the passes and the others to `needRewrite`; returns
    /// both, with each failure's error.
    private func writeAgain(_ objects: [(id: SliceID, bytes: [UInt8], isGarbage: Bool)], checked: Bool)
        -> (rewritten: [SliceID], failed: [(SliceID, Error)]) {
        var rewritten: [SliceID] = []
        var failed: [(SliceID, Error)] = []
        for object in objects {
            do {
                try chunks.rewriteJournaled(id: object.id, raw: object.bytes)
                if checked, try chunks.verify(id: object.id) != object.bytes.count {
                    throw WeftError(EIO, "it does not read back whole")
                }
                rewritten.append(object.id)
            } catch {
                failed.append((object.id, error))
            }
        }
        chunks.requeueJournaled(rewritten)
        chunks.needRewrite(failed.map(\.0))
        return (rewritten, failed)
    }

    private func rewriteJournaled(_ ids: [SliceID]) {
        guard !ids.isEmpty else { return }
        let wanted = Set(ids)
        let objects: [(id: SliceID, bytes: [UInt8], isGarbage: Bool)]
        do {
            objects = try meta.journaledObjects().filter { wanted.contains($0.id) }
        } catch {
            logger.error("objects the journal carries wait to be written again: cannot read their keys: \(error)")
            return chunks.needRewrite(ids)
        }
        // One without a key (collected meanwhile), garbage or gone is left alone.
        let (rewritten, failed) = writeAgain(objects.filter { !$0.isGarbage && chunks.exists(id: $0.id) }, checked: false)
        // One line per call, however many objects (this runs at every pass while a disk fails).
        if let (id, error) = failed.first {
            logger.error("after a failed sync, wrote \(rewritten.count) object(s) the journal carries again from the journal; \(failed.count) could not be written and wait (first: chunk object \(id): \(error))")
        } else {
            logger.warning("after a failed sync, wrote \(rewritten.count) object(s) the journal carries again from the journal")
        }
    }

    /// Reclaims what a crash left behind (unlinked-open inodes, unreferenced chunk objects) and
    /// starts background garbage collection and compaction.
    public func recover() throws {
        _ = try meta.reclaimOrphans()
        let check = try meta.checkMetadata(repair: false)
        var swept = 0
        try chunks.forEach { id, _, _ in
            if check.referencedSlices[id] == nil && !check.garbage.contains(id) {
                try chunks.delete(id: id)
                swept += 1
            }
        }
        if swept > 0 { logger.info("removed \(swept) chunk object(s) no file references (left by an interrupted write)") }
        maintenance.start()
    }

    /// Stops background work and makes everything durable.
    /// `syncingJournaled: false` leaves the objects whose bytes the journal carries unsynced,
    /// with their `J` keys, as a crash would (tests); the next open checks them either way.
    public func close(syncingJournaled: Bool = true) throws {
        maintenance.stop()
        if syncingJournaled {
            // A failure leaves the keys for the next open to check; the rest of close goes on.
            do { try syncJournaledObjects() } catch { logger.error("closing: sync of the objects the journal carries failed: \(error)") }
        }
        try meta.close()
        Glibc.unlink(Hub.leaseMarkerPath(directory))
    }

    /// Present while remote agents may hold leases (removed by a clean close).
    static func leaseMarkerPath(_ directory: String) -> String { directory + "/leases.active" }

    // MARK: HubAPI — sessions

    public func openSession(agentName: String) throws -> (SessionID, VolumeInfo) {
        (meta.openSession(agentName: agentName), meta.volume)
    }

    public func closeSession(_ session: SessionID) throws {
        // Whatever fails below: the session is over for its agent's files in flight.
        defer { if coLocatedWriters.withLock({ $0.remove(session) }) != nil { maintenance.sweepAgentTemporaries() } }
        leases.end(session)
        locks.release(session: session)
        try meta.closeSession(session)
        // Objects the session wrote but never committed (its agent died mid-write) are orphans.
        let abandoned = pendingUploads.end(session)
        try? chunks.delete(ids: abandoned)
        chunks.forgetSession(session)
        if !abandoned.isEmpty { logger.info("removed \(abandoned.count) chunk object(s) session \(session) never committed") }
        maintenance.wake()
    }

    // MARK: HubAPI — namespace

    public func lookup(_ context: RequestContext, parent: InodeID, name: [UInt8]) throws -> Attributes {
        try leased(context, { try meta.lookup(context.credentials, parent: parent, name: name) }) { [parent, $0.ino] }
    }

    public func getattr(_ context: RequestContext, ino: InodeID) throws -> Attributes {
        do {
            return try leased(context, { try meta.getattr(ino) }) { _ in [ino] }
        } catch let error as WeftError where error.errno == ENOENT {
            // Removed a moment ago: its last attributes, as a local `stat` that looked the name
            // up before the removal would have returned them; with a notice, so that nothing
            // caches them (SPEC.md §12.6, "An inode gone under a name").
            guard let last = removed.attributes(of: ino, askedBy: context.session) else { throw error }
            leases.notice(context.session, ino)
            return last
        }
    }

    public func setattr(_ context: RequestContext, ino: InodeID, _ changes: SetAttributes) throws -> Attributes {
        let attributes = try changing(context, [.init(ino)], reply: { _ in [ino] }) {
            try meta.setattr(context.credentials, ino: ino, changes)
        }
        if changes.size != nil { maintenance.wakeIfGarbage(meta.garbageMade) }
        return attributes
    }

    public func create(_ context: RequestContext, parent: InodeID, name: [UInt8], mode: UInt32, rdev: UInt32,
                       umask: UInt32, exclusive: Bool) throws -> Attributes {
        try changingEntries(context, parent: parent, name: name) {
            try meta.create(context.credentials, parent: parent, name: name, mode: mode, rdev: rdev, umask: umask,
                            exclusive: exclusive)
        }
    }

    public func mkdir(_ context: RequestContext, parent: InodeID, name: [UInt8], mode: UInt32, umask: UInt32) throws -> Attributes {
        try changingEntries(context, parent: parent, name: name) {
            try meta.mkdir(context.credentials, parent: parent, name: name, mode: mode, umask: umask)
        }
    }

    public func unlink(_ context: RequestContext, parent: InodeID, name: [UInt8]) throws {
        let victims = try removing(context, parent: parent, name: name) { expecting in
            try meta.unlink(context.credentials, parent: parent, name: name, expecting: expecting)
        }.victims
        noteRemoved(victims, by: context.session)
        maintenance.wakeIfGarbage(meta.garbageMade)
    }

    /// The parent's attributes are read inside the change, and the caller gets a lease on the
    /// parent with the reply (a notice if another change overtook it), as a create's reply does.
    public func unlinkEntry(_ context: RequestContext, parent: InodeID, name: [UInt8]) throws -> Attributes? {
        let (after, victims): (Attributes, [Attributes]) = try removing(context, parent: parent, name: name,
                                                                         reply: { _ in [parent] }) { expecting in
            try meta.unlink(context.credentials, parent: parent, name: name, expecting: expecting)
            return try meta.getattr(parent)
        }
        noteRemoved(victims, by: context.session)
        maintenance.wakeIfGarbage(meta.garbageMade)
        return after
    }

    /// As `create` + `open` + `acquireWriteLease`, with the parent's attributes read inside
    /// the create's change (never a read that waits for other changes of the directory).
    public func createOpen(_ context: RequestContext, parent: InodeID, name: [UInt8], mode: UInt32, umask: UInt32,
                           flags: Int32, writeLease: Bool) throws -> CreatedFile {
        // One transaction creates and opens (the creator may open a new file whatever mode it
        // was given; `O_TRUNC` has nothing to cut) and gives the directory's attributes after it;
        // the reply's lease covers the directory and the file.
        var parentAfter: Attributes?
        let created = try changingEntries(context, parent: parent, name: name) {
            let created = try meta.createOpen(context.credentials, session: context.session, parent: parent, name: name,
                                              mode: mode, umask: umask)
            parentAfter = created.parent
            return created.file
        }
        let leased = writeLease && created.isRegular ? leases.acquireWrite(context.session, created.ino) : false
        return CreatedFile(attributes: created, parent: parentAfter, writeLeased: leased)
    }

    public func rmdir(_ context: RequestContext, parent: InodeID, name: [UInt8]) throws {
        let victims = try removing(context, parent: parent, name: name) { expecting in
            try meta.rmdir(context.credentials, parent: parent, name: name, expecting: expecting)
        }.victims
        noteRemoved(victims, by: context.session)
    }

    public func symlink(_ context: RequestContext, parent: InodeID, name: [UInt8], target: [UInt8]) throws -> Attributes {
        try changingEntries(context, parent: parent, name: name) {
            try meta.symlink(context.credentials, parent: parent, name: name, target: target)
        }
    }

    public func readlink(_ context: RequestContext, ino: InodeID) throws -> [UInt8] {
        try meta.readlink(ino)
    }

    public func link(_ context: RequestContext, ino: InodeID, newParent: InodeID, newName: [UInt8]) throws -> Attributes {
        try changing(context, [.init(ino), .init(newParent, names: [newName])], reply: { _ in [ino, newParent] }) {
            try meta.link(context.credentials, ino: ino, newParent: newParent, newName: newName)
        }
    }

    public func rename(_ context: RequestContext, parent: InodeID, name: [UInt8], newParent: InodeID,
                       newName: [UInt8], flags: RenameFlags) throws {
        // Both names may change in both directories (RENAME_EXCHANGE); the moved inode's ctime
        // (and a directory's "..") changes; a replaced target loses a link.
        var children: [Attributes] = []
        try changingNames(context, lookup: { () -> ([LeaseTable.Target], [InodeID?]) in
            var targets: [LeaseTable.Target] = [.init(parent, names: [name, newName])]
            if newParent != parent { targets.append(.init(newParent, names: [name, newName])) }
            children = []
            var found: [InodeID?] = []
            for (directory, entry) in [(parent, name), (newParent, newName)] {
                let child = try? meta.lookup(.root, parent: directory, name: entry)
                if let child {
                    targets.append(.init(child.ino, isFile: child.isRegular))
                    children.append(child)
                }
                found.append(child?.ino)
            }
            return (targets, found)
        }) { expecting in
            try meta.rename(context.credentials, parent: parent, name: name, newParent: newParent, newName: newName,
                            flags: flags, expecting: (expecting[0], expecting[1]))
        }
        noteRemoved(children, by: context.session)   // a replaced target
        maintenance.wakeIfGarbage(meta.garbageMade)
    }

    public func readdir(_ context: RequestContext, ino: InodeID, after: [UInt8]?, limit: Int) throws -> [DirectoryEntry] {
        try leased(context, { try meta.readdir(context.credentials, ino: ino, after: after, limit: limit) }) { entries in
            [ino] + entries.map(\.ino)
        }
    }

    public func access(_ context: RequestContext, ino: InodeID, mask: UInt32) throws {
        try meta.access(context.credentials, ino: ino, mask: mask)
    }

    public func open(_ context: RequestContext, ino: InodeID, flags: Int32) throws -> Attributes {
        guard flags & O_TRUNC != 0 else {
            return try leasedOpen(context, ino: ino, flags: flags) { opened, repeated in
                repeated ? try meta.getattr(ino) : opened
            }
        }
        return try changing(context, [.init(ino, isFile: true)], reply: { _ in [ino] }) {
            try meta.open(context.credentials, session: context.session, ino: ino, flags: flags)
        }
    }

    /// `open` and the first `chunkCount` chunk lists, read together under one lease (SPEC.md §4
    /// opcode 53), with the attributes read with the lists; and a small file's bytes when it is
    /// one whole object held here. They are read after the lease is granted: objects never
    /// change, and one collected meanwhile only leaves the bytes out.
    public func openLayout(_ context: RequestContext, ino: InodeID, flags: Int32, chunkCount: UInt32,
                           dataMaxBytes: UInt32) throws -> OpenedLayout {
        guard flags & O_TRUNC == 0 else { throw WeftError(EINVAL, "openLayout does not truncate") }
        try Limits.checkListCount(Int(chunkCount), max: Limits.openLayoutChunksMax, "openLayout", "chunks")
        let (attributes, lists): (Attributes, [[Slice]]) = try leasedOpen(context, ino: ino, flags: flags) { opened, repeated in
            guard opened.isRegular, chunkCount > 0 else { return (repeated ? try meta.getattr(ino) : opened, []) }
            return try meta.layout(ino: ino, firstChunk: 0, count: chunkCount)
        }
        var data: [UInt8] = []
        if flags & O_ACCMODE != O_WRONLY, attributes.size <= UInt64(min(dataMaxBytes, UInt32(Limits.openLayoutDataMaxBytes))),
           let object = OpenedLayout.wholeObject(size: attributes.size, chunks: lists), object.hub == 0 {
            do {
                data = try self.chunks.read(id: object.id, offset: 0, length: Int(object.length))
            } catch {
                // The agent's own read of it reports a damaged object (EIO) as any read does.
                logger.debug("openLayout of inode \(ino): object \(object.id) left out: \(error)")
            }
        }
        return OpenedLayout(attributes: attributes, chunks: lists, data: data)
    }

    /// Registers an open (no `O_TRUNC`) once and runs `read` under a lease on the inode
    /// (`leased`). A read that `leased` repeats, after recalling another session's write lease,
    /// gets `repeated` and registers nothing again: until 2026-12-06 each repeat counted one more
    /// open, which one `release` did not end, so the file outlived its unlink until the session
    /// ended. An open registered by a call that then fails is released (the caller gets no
    /// handle to release).
    private func leasedOpen<T>(_ context: RequestContext, ino: InodeID, flags: Int32,
                               _ read: (_ opened: Attributes, _ repeated: Bool) throws -> T) throws -> T {
        var registered: Attributes?
        do {
            return try leased(context, {
                if let registered { return try read(registered, true) }
                let opened = try meta.open(context.credentials, session: context.session, ino: ino, flags: flags)
                registered = opened
                return try read(opened, false)
            }) { _ in [ino] }
        } catch {
            if registered?.isRegular == true {
                try? meta.release(session: context.session, ino: ino)
                maintenance.wakeIfGarbage(meta.garbageMade)
            }
            throw error
        }
    }

    public func release(_ context: RequestContext, ino: InodeID) throws {
        try meta.release(session: context.session, ino: ino)
        maintenance.wakeIfGarbage(meta.garbageMade)
    }

    /// One metadata transaction for all of them.
    public func releaseMany(_ context: RequestContext, inos: [InodeID]) throws {
        try Limits.checkListCount(inos.count, max: Limits.releaseManyMax, "releaseMany", "inodes")
        guard !inos.isEmpty else { return }
        try meta.release(session: context.session, inos: inos)
        maintenance.wakeIfGarbage(meta.garbageMade)
    }

    // MARK: HubAPI — xattrs, statfs

    public func getxattr(_ context: RequestContext, ino: InodeID, name: [UInt8]) throws -> [UInt8] {
        try meta.getxattr(context.credentials, ino: ino, name: name)
    }

    public func setxattr(_ context: RequestContext, ino: InodeID, name: [UInt8], value: [UInt8], flags: XattrFlags) throws {
        try changing(context, [.init(ino)]) {
            try meta.setxattr(context.credentials, ino: ino, name: name, value: value, flags: flags)
        }
    }

    public func listxattr(_ context: RequestContext, ino: InodeID) throws -> [[UInt8]] {
        try meta.listxattr(context.credentials, ino: ino)
    }

    public func removexattr(_ context: RequestContext, ino: InodeID, name: [UInt8]) throws {
        try changing(context, [.init(ino)]) {
            try meta.removexattr(context.credentials, ino: ino, name: name)
        }
    }

    /// Free space is what file data may still take: the disk's free space less the reserve.
    public func statfs(_ context: RequestContext) throws -> FileSystemStats {
        let diskFree = try chunks.space().freeBytes
        let free = diskFree - min(diskFree, chunks.reserveBytes)
        let used = chunks.storedBytes
        return try meta.statfs(totalBytes: free + used, freeBytes: free)
    }

    // MARK: HubAPI — data

    public func allocateSliceIDs(_ context: RequestContext, count: UInt32) throws -> SliceID {
        try meta.allocateSliceIDs(count: count)
    }

    public func writeSlice(_ context: RequestContext, id: SliceID, data: [UInt8]) throws {
        try data.withUnsafeBytes { try writeSlice(context, id: id, bytes: $0) }
    }

    public func writeSlice(_ context: RequestContext, id: SliceID, bytes: UnsafeRawBufferPointer) throws {
        try checkUpload(id: id, rawLength: bytes.count)
        try chunks.write(id: id, data: bytes)
        pendingUploads.add(id, session: context.session)
    }

    public func writeObject(_ context: RequestContext, id: SliceID, image: UnsafeRawBufferPointer) throws {
        guard meta.volume.compression == .zstd else {
            throw WeftError(EINVAL, "this volume stores objects uncompressed; send writeSlice")
        }
        // The raw length is checked after the image (a damaged length field is EBADMSG).
        try checkUpload(id: id, rawLength: 0)
        try chunks.writeImage(id: id, image: image, maxRawLength: Int(meta.volume.chunkSizeBytes))
        pendingUploads.add(id, session: context.session)
    }

    /// Takes over the object a co-located agent wrote into this hub's store under `tag` (SPEC.md
    /// §4, Co-located writes): as `writeSlice` from there on. The temporary file goes on any refusal.
    public func adoptObject(_ context: RequestContext, id: SliceID, tag: UInt32) throws {
        if meta.isSessionOpen(context.session) { _ = coLocatedWriters.withLock { $0.insert(context.session) } }
        do {
            try checkUpload(id: id, rawLength: 0)
        } catch {
            chunks.removeTemporary(id: id, tag: tag)
            throw error
        }
        try chunks.adopt(id: id, tag: tag, maxRawLength: Int(meta.volume.chunkSizeBytes))
        pendingUploads.add(id, session: context.session)
        adoptedObjects.add(1, ordering: .relaxed)
    }

    /// Objects taken over from co-located agents (`adoptObject`) since the hub started.
    public var adoptedObjectCount: Int { adoptedObjects.load(ordering: .relaxed) }

    /// How long after a co-located writer's session ends, and how old, its agents' temporary
    /// files are swept (fsck's orphan grace, 60 s; tests shorten it).
    public var agentTemporaryGraceSeconds: TimeInterval {
        get { maintenance.temporaryGraceSeconds }
        set { maintenance.temporaryGraceSeconds = newValue }
    }

    /// Removes co-located agents' temporary files last modified more than `olderThanNs` ago
    /// (their agents were killed before handing them over); returns how many it removed. A
    /// live agent's file that old (a write stalled that long) goes too: its hand-over then
    /// fails with ENOENT and the object goes over TCP (SPEC.md §4, Co-located writes).
    @discardableResult
    func removeAgentTemporaries(olderThanNs: Int64) throws -> Int {
        let now = currentTimeNs()
        var stale: [(SliceID, UInt32)] = []
        try chunks.forEachAgentTemporary { id, tag, _, modifiedNs in
            if now - modifiedNs > olderThanNs { stale.append((id, tag)) }
        }
        let removed = stale.filter { chunks.removeTemporary(id: $0.0, tag: $0.1) }.count
        if removed > 0 {
            logger.notice("removed \(removed) temporary file(s) of co-located agents' writes never handed over (an agent ended mid-write)")
        }
        return removed
    }

    private func checkUpload(id: SliceID, rawLength: Int) throws {
        guard id != 0, id < meta.currentCounters.nextSlice else { throw WeftError(EINVAL, "slice id \(id) was never allocated") }
        guard rawLength <= Int(meta.volume.chunkSizeBytes) else { throw WeftError(EINVAL, "slice larger than a chunk") }
    }

    public func readSlice(_ context: RequestContext, id: SliceID, offset: UInt32, length: UInt32) throws -> [UInt8] {
        guard length <= UInt32(Limits.transferMaxBytes) else { throw WeftError.invalid }
        return try chunks.read(id: id, offset: Int(offset), length: Int(length))
    }

    public func readSlice(_ context: RequestContext, id: SliceID, offset: UInt32,
                          into destination: UnsafeMutableRawBufferPointer) throws {
        guard destination.count <= Limits.transferMaxBytes else { throw WeftError.invalid }
        try chunks.read(id: id, offset: Int(offset), into: destination)
    }

    public func storedBlocks(_ context: RequestContext, id: SliceID, firstBlock: Int, count: Int) throws -> StoredBlocks {
        try chunks.storedBlocks(id: id, firstBlock: firstBlock, count: count)
    }

    public func layout(_ context: RequestContext, ino: InodeID, firstChunk: UInt32, count: UInt32) throws -> (Attributes, [[Slice]]) {
        try leased(context, { try meta.layout(ino: ino, firstChunk: firstChunk, count: count) }) { _ in [ino] }
    }

    public func commitSlices(_ context: RequestContext, ino: InodeID, slices: [SliceCommit], minimumSize: UInt64,
                             durable: Bool) throws -> Attributes {
        // Objects held by another hub (`hub` ≠ 0) were made durable there before this commit
        // (SPEC.md §12.5); this hub checks only its own.
        for commit in slices where commit.slice.hub == 0 {
            // An object lost to a hub restart before its commit: the agent must write it again.
            let length = try? chunks.length(id: commit.slice.id)
            guard let length, UInt32(length) == commit.slice.objectLength else {
                throw WeftError(ESTALE, "chunk object \(commit.slice.id) is missing or has the wrong length")
            }
        }
        // An object a failed sync pass took may be lost: the agent writes it again (SPEC.md §3.2,
        // "Objects lost to a failed pass"). From here a pass failing on one tells this inode.
        let own = slices.filter { $0.slice.hub == 0 }.map(\.slice.id)
        if let lost = chunks.assign(own, inode: ino, session: context.session).first {
            throw WeftError(ESTALE, "chunk object \(lost) could not be made durable (a sync of it failed)")
        }
        // The commit claims its objects first, so that a discard can never delete one that a
        // commit under way may reference; a commit that fails gives them back.
        // A commit naming objects that another commit under way claimed (this one is a retry of
        // it, after a barrier's timeout) waits for that one first: otherwise it could be
        // acknowledged, durable, while those objects were neither synced nor in a written journal
        // record (SPEC.md §5).
        let claimed = try pendingUploads.takeForCommit(slices.map(\.slice.id), session: context.session,
                                                       waitSeconds: Self.claimedObjectsWaitSeconds)
        defer { pendingUploads.endCommit(claimed) }
        // Only objects no commit referenced before (a commit whose reply was lost may have
        // been applied, and its record may become durable without any key).
        let fresh = Set(claimed)
        // Non-durable commits too (a close): otherwise the next durable change of any file (a
        // strict create) syncs their objects and fan-out directories first.
        let journaled = journal(slices.filter { fresh.contains($0.slice.id) })
        testBeforeCommitApply?(ino)
        let attributes: Attributes
        do {
            attributes = try changing(context, [.init(ino, isFile: true)], reply: { _ in [ino] }) {
                try meta.commitSlices(ino: ino, slices: slices, minimumSize: minimumSize, durable: durable,
                                      journaled: journaled)
            }
        } catch {
            chunks.uncover(journaled.map(\.id))
            // A change can fail after it applied (its sync failed): objects the file now
            // references are committed, and a discard or the session's end must not delete them.
            let referenced = referencedObjects(claimed, ino: ino, chunkIndexes: Set(slices.map(\.chunkIndex)))
            pendingUploads.giveBack(claimed.filter { !referenced.contains($0) }, session: context.session)
            // Objects the file does not name are no concern of its inode or this session.
            chunks.assign(own.filter { !referenced.contains($0) }, inode: 0, session: 0)
            if durable, let failure = error as? WeftError, failure.errno == EIO || failure.errno == ENOSPC {
                _ = chunks.takeFailure(inode: ino, session: context.session)   // this error is the report (SPEC.md §3.2)
            }
            throw error
        }
        chunks.journalCommitted(journaled.map(\.id))
        if chunks.journaledCount >= Self.journaledObjectsWake { maintenance.wake() }
        maintenance.considerCompaction(ino: ino, chunkIndexes: Set(slices.map(\.chunkIndex)))
        if durable && chunks.takeFailure(inode: ino, session: context.session) {
            // Applied and synced, but a pass failed on an object of this file (this commit's, or
            // an earlier non-durable one's): its bytes may be lost. The objects stay the file's.
            throw WeftError(EIO, "a chunk sync of inode \(ino)'s data failed: its durability is unknown")
        }
        return attributes
    }

    /// Those of `ids` that chunks `chunkIndexes` of `ino` reference (all of them when the layout
    /// cannot be read: keeping an upload is safe, deleting a referenced one is not).
    private func referencedObjects(_ ids: [SliceID], ino: InodeID, chunkIndexes: Set<UInt32>) -> Set<SliceID> {
        guard !ids.isEmpty else { return [] }
        var found = Set<SliceID>()
        for index in chunkIndexes {
            do {
                for slice in try meta.layout(ino: ino, firstChunk: index, count: 1).1.first ?? [] { found.insert(slice.id) }
            } catch let error as WeftError where error.errno == ENOENT || error.errno == ESTALE {
                continue   // the file is gone: nothing references its objects
            } catch {
                return Set(ids)
            }
        }
        return found.intersection(ids)
    }

    /// Longest a commit waits for another commit under way that claimed objects it names
    /// (`PendingUploads.takeForCommit`); then ETIMEDOUT, which the agent retries.
    static let claimedObjectsWaitSeconds = 30.0

    /// Objects the journal carries past this many wake the maintenance thread to sync them.
    static let journaledObjectsWake = 64

    /// For a commit in strict mode: the small objects of `slices` this hub holds that
    /// still wait for a sync pass, taken out of the passes, with their raw bytes for the
    /// commit's journal record (SPEC.md §5, "Small objects in the journal").
    private func journal(_ slices: [SliceCommit]) -> [(id: SliceID, bytes: [UInt8])] {
        guard meta.durability == .strict else { return [] }
        var candidates: [SliceID] = []
        for commit in slices where commit.slice.hub == 0 && Int(commit.slice.objectLength) <= Limits.journaledObjectMaxBytes
            && !candidates.contains(commit.slice.id) && candidates.count < Limits.journaledObjectsPerCommitMax {
            candidates.append(commit.slice.id)
        }
        guard !candidates.isEmpty else { return [] }
        let lengths = Dictionary(slices.map { ($0.slice.id, Int($0.slice.objectLength)) }, uniquingKeysWith: { a, _ in a })
        var journaled: [(id: SliceID, bytes: [UInt8])] = []
        for id in chunks.coverByJournal(candidates) {
            guard let bytes = try? chunks.read(id: id, offset: 0, length: lengths[id]!) else {
                chunks.uncover([id])  // synced by the next pass, as before
                continue
            }
            journaled.append((id, bytes))
        }
        return journaled
    }

    public func sync(_ context: RequestContext) throws {
        try sync(reporting: { chunks.takeFailure(session: context.session) },
                 "a chunk sync of data this session wrote failed: its durability is unknown")
    }

    public func syncFile(_ context: RequestContext, ino: InodeID) throws {
        try sync(reporting: { chunks.takeFailure(inode: ino, session: context.session) },
                 "a chunk sync of this file's data failed: its durability is unknown")
    }

    /// Makes every change durable, then gives the report `take` takes (SPEC.md §3.2) as EIO
    /// with `message`. A sync that fails itself is that report: it takes it and throws its own.
    private func sync(reporting take: () -> Bool, _ message: String) throws {
        testBeforeSync?()
        do {
            try meta.sync()
        } catch {
            _ = take()
            throw error
        }
        if take() { throw WeftError(EIO, message) }
    }

    public func discardUploads(_ context: RequestContext, ids: [SliceID]) throws {
        try Limits.checkDiscardUploads(ids.count)
        let discarded = pendingUploads.take(ids, session: context.session)
        try chunks.delete(ids: discarded)
        if !discarded.isEmpty { logger.debug("discarded \(discarded.count) upload(s) of a failed commit, session \(context.session)") }
    }

    // MARK: HubAPI — administration

    public func status() throws -> HubStatus {
        let counters = meta.currentCounters
        let agents = meta.agentNames
        return HubStatus(volume: meta.volume, logicalBytes: counters.logicalBytes, inodes: counters.inodes,
                         chunks: chunks.objectCount, storedBytes: chunks.storedBytes,
                         connectedAgents: UInt32(agents.count), agents: agents)
    }

    public func fsck(repair: Bool) throws -> FsckReport {
        try Fsck(hub: self).run(repair: repair)
    }
}

extension Hub {
    public func lock(_ context: RequestContext, ino: InodeID, _ request: LockRequest) throws -> LockDescription {
        // The inode must exist (and be a file or directory the caller can see).
        _ = try meta.getattr(ino)
        return try locks.apply(session: context.session, ino: ino, request)
    }
}

// MARK: Leases (SPEC.md §12.6)

extension Hub {
    public func enableLeases(_ session: SessionID, client: LeaseClient) throws {
        if client.survivesHubRestart { try markLeases() }
        leases.enable(session, client: client)
    }

    public func acquireWriteLease(_ context: RequestContext, ino: InodeID) throws -> Bool {
        leases.waitForGrace()
        guard try meta.getattr(ino).isRegular else { throw WeftError(EINVAL, "write leases are for regular files") }
        return leases.acquireWrite(context.session, ino)
    }

    public func reclaimWriteLease(_ context: RequestContext, ino: InodeID) throws -> Bool {
        guard try meta.getattr(ino).isRegular else { throw WeftError(EINVAL, "write leases are for regular files") }
        let granted = leases.reclaimWrite(context.session, ino)
        logger.info("write lease reclaim", metadata: ["ino": "\(ino)", "granted": "\(granted)"])
        return granted
    }

    /// Writes the lease marker once (durably), so that a crash leaves a grace period behind.
    private func markLeases() throws {
        let path = Hub.leaseMarkerPath(directory)
        guard !FileManager.default.fileExists(atPath: path) else { return }
        let fd = Glibc.open(path, O_CREAT | O_WRONLY | O_CLOEXEC, 0o644)
        guard fd >= 0 else { throw WeftError(errno, "cannot create \(path)") }
        Glibc.close(fd)
        let dir = Glibc.open(directory, O_RDONLY | O_DIRECTORY | O_CLOEXEC)
        if dir >= 0 {
            fsync(dir)
            Glibc.close(dir)
        }
    }

    /// Runs a read for the caller and grants it read leases on the inodes `inodes` names in the
    /// result; reads again if a writer's lease had to be recalled first.
    func leased<T>(_ context: RequestContext, _ read: () throws -> T, inodes: (T) -> [InodeID]) throws -> T {
        leases.waitForGrace()
        guard leases.isEnabled(context.session) else { return try read() }
        while true {
            let token = leases.readToken()
            let result = try read()
            if leases.grant(context.session, inodes(result), since: token) { return result }
        }
    }

    /// Applies a change after recalling other sessions' leases on `targets`; the caller is then
    /// granted leases on the inodes `reply` names in the result (its reply shows them after the
    /// change).
    @discardableResult
    func changing<T>(_ context: RequestContext, _ targets: [LeaseTable.Target], reply: (T) -> [InodeID] = { _ in [] },
                     _ apply: () throws -> T) throws -> T {
        leases.waitForGrace()
        let token = leases.beginChange(context.session, targets)
        let result: T
        do {
            result = try apply()
        } catch {
            leases.endChange(targets)
            throw error
        }
        // Granted before the change ends, so that its own end does not count as one that
        // overtook its reply (SPEC.md §12.6, "A read across a change's end").
        _ = leases.grant(context.session, reply(result), since: token, ownChange: targets)
        leases.endChange(targets)
        return result
    }

    /// A change that adds entry `name` to `parent` and returns the new entry's attributes.
    func changingEntries(_ context: RequestContext, parent: InodeID, name: [UInt8],
                         _ apply: () throws -> Attributes) throws -> Attributes {
        try changing(context, [.init(parent, names: [name])], reply: { [parent, $0.ino] }, apply)
    }

    /// What removing `name` from `parent` changes: the directory's entry, and the inode's
    /// links; and the inode's attributes before the change.
    func removal(parent: InodeID, name: [UInt8]) -> (targets: [LeaseTable.Target], victims: [Attributes]) {
        var targets: [LeaseTable.Target] = [.init(parent, names: [name])]
        guard let child = try? meta.lookup(.root, parent: parent, name: name) else { return (targets, []) }
        targets.append(.init(child.ino, isFile: child.isRegular))
        return (targets, [child])
    }

    /// Removes `name` from `parent` (`apply`, given what the name must hold), recalling the
    /// directory and the inode the name holds; returns the result and the removed inode's
    /// attributes from before.
    func removing<T>(_ context: RequestContext, parent: InodeID, name: [UInt8], reply: (T) -> [InodeID] = { _ in [] },
                     _ apply: (EntryExpectation) throws -> T) throws -> (result: T, victims: [Attributes]) {
        var victims: [Attributes] = []
        let result = try changingNames(context, lookup: {
            let removal = removal(parent: parent, name: name)
            victims = removal.victims
            return (removal.targets, [victims.first?.ino])
        }, reply: reply) { expecting in try apply(expecting[0]) }
        return (result, victims)
    }

    /// How many times a change of names is made again because another change replaced what a
    /// name held between its lookup and its apply; the last try applies whatever the names hold.
    static let nameChangeTriesMax = 8

    /// A change of names (unlink, rmdir, rename) recalls the leases on the inodes the names
    /// hold, which it looks up before the change begins (`lookup`: the targets to recall and what
    /// each name holds). Another change of the same names can replace them in between; the apply
    /// then finds other inodes than it recalled (`EntryChanged`), and the change is made again
    /// from the lookup, recalling the new ones (SPEC.md §12.6, "A racing rename").
    func changingNames<T>(_ context: RequestContext, lookup: () -> ([LeaseTable.Target], [InodeID?]),
                          reply: (T) -> [InodeID] = { _ in [] },
                          _ apply: ([EntryExpectation]) throws -> T) throws -> T {
        var attempt = 0
        while true {
            attempt += 1
            let (targets, found) = lookup()
            let last = attempt >= Self.nameChangeTriesMax
            if last {
                logger.info("a change of names applies after \(attempt - 1) tries found them replaced: inodes it did not recall may change")
            }
            let expecting = last ? found.map { _ in .any } : found.map(EntryExpectation.init)
            do {
                return try changing(context, targets, reply: reply) {
                    testBeforeNamesApply?()
                    return try apply(expecting)
                }
            } catch is EntryChanged {
                countChangedUnderfoot()
            }
        }
    }

    /// After `session`'s change that may have removed `victims` (their attributes from before
    /// it): keeps those that are gone for other sessions' `getattr` (`RemovedInodes`).
    func noteRemoved(_ victims: [Attributes], by session: SessionID) {
        for victim in victims {
            do {
                _ = try meta.getattr(victim.ino)
            } catch let error as WeftError where error.errno == ENOENT {
                removed.record(victim, removedBy: session)
            } catch {}
        }
    }
}

/// The attributes of inodes removed in the last `keepNs` (at most `countMax`). A `stat(path)`
/// is a lookup, then a `GETATTR` of the inode found; when another session's change removes
/// that inode in between, `getattr` answers with its last attributes, as a local file system
/// that looked the name up before the removal would have, instead of ENOENT. The session that
/// removed it gets ENOENT (it knows; nothing of its own can race its own change).
final class RemovedInodes: @unchecked Sendable {
    static let keepNs: UInt64 = 5_000_000_000
    static let countMax = 4096
    private let lock = NSLock()
    private var entries: [InodeID: (attributes: Attributes, by: SessionID, atNs: UInt64)] = [:]
    /// Oldest first.
    private var order: [InodeID] = []

    func record(_ attributes: Attributes, removedBy session: SessionID) {
        lock.withLock {
            if entries[attributes.ino] == nil { order.append(attributes.ino) }
            entries[attributes.ino] = (attributes, session, Leases.nowNs())
            if order.count > Self.countMax {
                let dropped = order.count - Self.countMax * 3 / 4
                for ino in order.prefix(dropped) { entries[ino] = nil }
                order.removeFirst(dropped)
            }
        }
    }

    func attributes(of ino: InodeID, askedBy session: SessionID) -> Attributes? {
        lock.withLock {
            guard let entry = entries[ino], entry.by != session, Leases.nowNs() &- entry.atNs < Self.keepNs else {
                return nil
            }
            return entry.attributes
        }
    }
}

