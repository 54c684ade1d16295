import Foundation
import Logging
import WeftProto

/// When a metadata change is on stable storage relative to its reply.
public enum DurabilityMode: String, Sendable, CaseIterable {
    /// Every mutation's journal record is synced (shared between concurrent mutations) before the reply.
    case strict
    /// The journal record is written before the reply (survives a process kill) and synced once
    /// a second.
    case periodic
}

/// The metadata engine of one volume: namespace, attributes, xattrs and file layouts in RocksDB.
///
/// Every operation is linearizable: mutations run one at a time under `lock`, and each is one
/// atomic RocksDB write batch. In `.strict` mode a mutation returns only after its batch is durable;
/// reads wait until whatever they may observe is durable, so nothing observed can be lost.
/// Permission checks follow POSIX for the caller's credentials.
public final class MetaStore: @unchecked Sendable {
    let db: RocksDB
    let lock = NSLock()
    let groupCommit: GroupCommit
    /// The write-ahead log of every batch (SPEC.md §3.3); RocksDB's own WAL is not used.
    let journal: MetaJournal
    /// What the journal's replay found when this store opened.
    let journalRecovery: MetaJournal.Recovery
    /// Chunk objects that the replayed changes added to files, that files still reference and
    /// that were not on the disk at open (SPEC.md §5, "Objects lost with unsynced commits").
    public let objectsMissingAtOpen: [SliceID]
    private var mutationsSinceMemtableCheck = 0
    private var bytesSinceMemtableCheck = 0
    let logger: Logger
    public let volume: VolumeInfo
    public let durability: DurabilityMode
    var counters: Counters
    var openCounts: [InodeID: Int] = [:]
    /// Committed transactions that made garbage (see `garbageMade`).
    private var garbageMadeCount: UInt64 = 0
    var sessions: [SessionID: Session] = [:]
    var nextSession: SessionID = 1
    private var periodicSync: Thread?
    private let stopSignal = StopSignal()

    final class StopSignal: @unchecked Sendable {
        let condition = NSCondition()
        var stopped = false
        var exited = false
    }

    struct Session {
        var agentName: String
        var opens: [InodeID: Int] = [:]
    }

    /// The volume format this engine writes: 2, metadata journal (1: RocksDB's WAL, upgraded at
    /// open).
    public static let formatVersion: UInt32 = 2
    /// A checkpoint comes when RocksDB's active memtable holds more than this (checked every 64
    /// changes and every `memtableCheckBytes` logged), far below `RocksDB.writeBufferBytes`.
    static let checkpointMemtableBytes: UInt64 = 32 << 20
    static let memtableCheckBytes = 1 << 20

    /// Runs before every journal sync (the hub makes chunk data durable here).
    public var beforeSync: (() throws -> Void)? {
        get { groupCommit.beforeSync }
        set { groupCommit.beforeSync = newValue }
    }

    /// Creates a new, empty volume in `path`. Throws EEXIST if one exists there.
    /// Ids a volume may use: slice ids `firstSliceID ..< firstSliceID + 2^48`, inode numbers
    /// below 2^48 (SPEC.md §12.3: the cluster puts the volume id in the top 16 bits).
    public static let idSpace: UInt64 = 1 << 48

    /// Creates an empty volume. `firstSliceID` is the first slice id it hands out: 1 for a
    /// single-hub volume, `volumeID << 48 | 1` for a cluster volume.
    public static func format(path: String, volume: VolumeInfo, firstSliceID: UInt64 = 1) throws {
        let db = try RocksDB(path: path, createIfMissing: true)
        if try db.get(Key.volume) != nil { throw WeftError(EEXIST, "a Weft volume already exists in \(path)") }
        var volume = volume
        volume.formatVersion = formatVersion
        try MetaJournal.create(inDirectory: path, geometry: MetaJournal.Geometry())
        let now = volume.createdNs
        let root = InodeRecord(attributes: Attributes(ino: InodeNumbers.root, mode: UInt32(S_IFDIR) | 0o755, nlink: 2,
                                                      uid: 0, gid: 0, atimeNs: now, mtimeNs: now, ctimeNs: now),
                               parent: InodeNumbers.root)
        let batch = WriteBatch()
        var w = ByteWriter()
        volume.encode(into: &w)
        batch.put(Key.volume, w.bytes)
        batch.put(Key.counters, Counters(nextSlice: firstSliceID).encoded())
        batch.put(Key.inode(InodeNumbers.root), root.encoded())
        try db.write(batch, sync: true)
    }

    /// Opens the volume in `path` (see the designated initializer). `objectCheck`, given the
    /// volume before the replay, returns how to tell whether a chunk object is on the disk; the
    /// objects that replayed changes added to files and that are not are reported
    /// (`objectsMissingAtOpen`, SPEC.md §5, "Objects lost with unsynced commits"). Without it
    /// nothing is checked.
    public convenience init(path: String, durability: DurabilityMode, logger: Logger,
                            objectCheck: ((VolumeInfo) throws -> ObjectCheck)? = nil) throws {
        try self.init(path: path, durability: durability, journalGeometry: MetaJournal.Geometry(), logger: logger,
                      objectCheck: objectCheck)
    }

    /// Opens the volume in `path`: RocksDB, then the journal's replay (SPEC.md §3.3), then a
    /// checkpoint. A volume of format 1 gets a journal and becomes format 2.
    init(path: String, durability: DurabilityMode, journalGeometry: MetaJournal.Geometry, logger: Logger,
         objectCheck: ((VolumeInfo) throws -> ObjectCheck)? = nil) throws {
        // The journal holds every change the memtables hold: a close writes them out only
        // through a checkpoint, which looks for room first (SPEC.md §3.3, Full disk).
        try Self.ensureRoomToOpen(path)
        db = try RocksDB(path: path, createIfMissing: false, keepMemtablesAtClose: true)
        self.durability = durability
        self.logger = logger
        let database = db
        let storedVolume = try Self.readVolume(database, path: path)
        let storedFormat = storedVolume.formatVersion
        let isPresent = try objectCheck?(storedVolume)
        if !MetaJournal.exists(inDirectory: path) {
            guard storedFormat == 1 else {
                throw WeftError(EIO, "metadata journal \(MetaJournal.path(inDirectory: path)) is missing")
            }
            try MetaJournal.create(inDirectory: path, geometry: journalGeometry)
        }
        var missing: [SliceID] = []
        let (journal, recovery) = try MetaJournal.open(inDirectory: path, geometry: journalGeometry, logger: logger) {
            if let isPresent {
                for id in try Self.missingObjects(introducedBy: $0, db: database, isPresent: isPresent)
                where !missing.contains(id) {
                    missing.append(id)
                }
            }
            try database.apply(serialized: $0)
        }
        self.journal = journal
        journalRecovery = recovery
        var volume = try Self.readVolume(database, path: path)
        if volume.formatVersion == 1 {
            volume.formatVersion = Self.formatVersion
            var writer = ByteWriter()
            volume.encode(into: &writer)
            let batch = WriteBatch()
            batch.put(Key.volume, writer.bytes)
            try db.apply(batch)
            logger.info("volume \(path) upgraded to format \(Self.formatVersion) (metadata journal)")
        }
        self.volume = volume
        guard let counterBytes = try db.get(Key.counters) else { throw WeftError(EIO, "volume counters missing") }
        counters = try Counters.decode(counterBytes)
        groupCommit = GroupCommit(syncLog: { try journal.sync() })
        // Reported, not changed: the range reads as EIO and names the object, and `weft fsck
        // --repair` drops the references. Objects a later change of the lap no longer
        // references (overwritten, truncated: garbage) are no loss.
        let referenced = Set(try Self.chunksReferencing(Set(missing), in: database).flatMap { $0.2.map(\.id) })
        let lost = missing.filter { referenced.contains($0) }
        objectsMissingAtOpen = lost
        if !lost.isEmpty {
            logger.warning("""
                metadata journal: \(lost.count) chunk object(s) that changes since the last checkpoint added \
                to files are not on the disk (a power loss before a commit that was not fsynced reached it): \
                \(lost.prefix(8).map { String(format: "%016llx", $0) }.joined(separator: ", ")); their \
                ranges read as EIO until `weft fsck --repair` drops them
                """)
        }
        lock.lock()
        defer { lock.unlock() }
        try checkpoint()
        if recovery.replayedRecords > 0 {
            logger.info("replayed \(recovery.replayedRecords) metadata changes from the journal (lap \(recovery.lap))")
        }
        if durability == .periodic {
            let commit = groupCommit, stop = stopSignal, log = logger
            let thread = Thread {
                // Holds no reference to the store, so closing it is never delayed.
                while true {
                    stop.condition.lock()
                    if !stop.stopped { _ = stop.condition.wait(until: Date().addingTimeInterval(1)) }
                    let finished = stop.stopped
                    stop.condition.unlock()
                    do { try commit.syncAll() } catch { log.error("periodic metadata sync failed: \(error)") }
                    if finished { break }
                }
                stop.condition.lock()
                stop.exited = true
                stop.condition.broadcast()
                stop.condition.unlock()
            }
            thread.name = "weft-meta-sync"
            periodicSync = thread
            thread.start()
        }
    }

    deinit {
        // RocksDB drops its memtables when it closes (`keepMemtablesAtClose`): the journal must
        // hold them, also for a store dropped without `close()` (SPEC.md §3.3).
        try? journal.sync()
    }

    private static func readVolume(_ db: RocksDB, path: String) throws -> VolumeInfo {
        guard let volumeBytes = try db.get(Key.volume) else { throw WeftError(EINVAL, "\(path) holds no Weft volume") }
        let volume = try volumeBytes.decode { try VolumeInfo.decode(from: &$0) }
        guard volume.formatVersion == 1 || volume.formatVersion == formatVersion else {
            throw WeftError(EINVAL, "unsupported volume format version \(volume.formatVersion)")
        }
        return volume
    }

    /// Makes every acknowledged change durable and stops background work (waits for it).
    public func close() throws {
        if periodicSync != nil {
            stopSignal.condition.lock()
            stopSignal.stopped = true
            stopSignal.condition.broadcast()
            while !stopSignal.exited { stopSignal.condition.wait() }
            stopSignal.condition.unlock()
            periodicSync = nil
        }
        lock.lock()
        defer { lock.unlock() }
        do {
            try ensureRoomToCheckpoint(adding: 0)
        } catch let error as WeftError {
            // Durable all the same: the journal holds every change, and the next open replays it.
            try groupCommit.syncAll()
            logger.warning("closing the metadata store without a checkpoint: \(error.message)")
            return
        }
        try checkpoint()
    }

    // MARK: transactions

    /// Runs `body` as one atomic mutation. Its batch is applied only if `body` returns.
    func mutate<T>(durable: Bool = true, _ body: (Transaction) throws -> T) throws -> T {
        lock.lock()
        let transaction = Transaction(store: self)
        let result: T
        var seq: UInt64 = 0
        do {
            result = try body(transaction)
            if transaction.batch.count > 0 || transaction.counters != counters {
                if transaction.counters != counters {
                    transaction.batch.put(Key.counters, transaction.counters.encoded())
                }
                try logAndApply(transaction.batch)
                counters = transaction.counters
                if transaction.addsGarbage { garbageMadeCount &+= 1 }
                seq = groupCommit.applied(promised: durable && durability == .strict)
            }
            lock.unlock()
        } catch {
            lock.unlock()
            throw error
        }
        if seq > 0 && durable && durability == .strict {
            try groupCommit.waitDurable(seq)
        }
        return result
    }

    /// Under `lock`: logs `batch` in the journal, then applies it to RocksDB's memtable. A batch
    /// too large for a record is applied and checkpointed at once. Checkpoints first when the
    /// memtable has grown past `checkpointMemtableBytes` or the journal is full, so that a failed
    /// checkpoint fails the change before it has any effect.
    private func logAndApply(_ batch: WriteBatch) throws {
        let offset = try batch.withSerialized { payload -> Int? in
            mutationsSinceMemtableCheck += 1
            bytesSinceMemtableCheck += payload.count
            if mutationsSinceMemtableCheck >= 64 || bytesSinceMemtableCheck >= Self.memtableCheckBytes {
                // Counted again only after a checkpoint that worked: one that failed (no room)
                // is tried again by the next change, which fails the same way meanwhile.
                if db.activeMemtableBytes > Self.checkpointMemtableBytes { try checkpoint() }
                mutationsSinceMemtableCheck = 0
                bytesSinceMemtableCheck = 0
            }
            guard MetaJournal.recordBytes(payload: payload.count) <= journal.geometry.largestRecordBytes else { return nil }
            if let offset = try journal.append(payload) { return offset }
            try checkpoint()
            return try journal.append(payload)
        }
        guard let offset else {
            try checkpoint(applying: batch)
            return
        }
        do {
            try db.apply(batch)
        } catch {
            journal.rollBack(to: offset)
            throw error
        }
    }

    /// Under `lock`: makes every logged change part of RocksDB's files and starts a new journal
    /// lap (SPEC.md §3.3). The journal is synced before RocksDB writes anything out, so RocksDB's
    /// files never hold a change the journal could lose. `batch` (one too large to log) is
    /// applied after that sync and written out with the rest.
    func checkpoint(applying batch: WriteBatch? = nil) throws {
        try ensureRoomToCheckpoint(adding: UInt64(batch?.byteCount ?? 0))
        try groupCommit.syncAll()
        if let batch { try db.apply(batch) }
        try db.flushMemtables()
        try journal.startLap()
    }

    /// Room on the metadata disk that a checkpoint must find before RocksDB writes anything, on
    /// top of twice the memtable and what compaction has pending (SPEC.md §3.3, Full disk).
    static let checkpointHeadroomBytes: UInt64 = 8 << 20
    /// The most a compaction after a checkpoint is assumed to write when RocksDB has nothing
    /// pending yet: its table files, up to this (level 0 and level 1's 256 MiB target).
    static let compactionHeadroomMaxBytes: UInt64 = 512 << 20

    /// Throws ENOSPC unless the metadata disk in `path` has room for what opening the store
    /// writes: RocksDB's new MANIFEST, OPTIONS, write-ahead log and LOG header (a full disk
    /// there aborts Debian's build), then the checkpoint after the replay, whose memtables hold
    /// at most what the journal holds.
    static func ensureRoomToOpen(_ path: String) throws {
        guard let free = RocksDB.freeBytes(at: path) else { return }
        var journal = stat()
        let journalBytes = stat(MetaJournal.path(inDirectory: path), &journal) == 0 ? UInt64(max(journal.st_size, 0)) : 0
        let needed = 2 * journalBytes + checkpointHeadroomBytes
        guard free < needed else { return }
        throw WeftError(ENOSPC, "metadata disk of \(path) has \(free) bytes free and opening the store needs \(needed): "
                            + "free some space on it (every acknowledged change is in the journal)")
    }

    /// Throws ENOSPC, before anything is written, when the metadata disk lacks the room a
    /// checkpoint needs. RocksDB is never let to run out of space while it writes its files:
    /// Debian's build then aborts the process (an assertion in `WritableFileWriter`), and a
    /// release build stops taking writes until it is reopened.
    private func ensureRoomToCheckpoint(adding extra: UInt64) throws {
        guard let free = db.freeBytes else { return }
        // A flush that brings level 0 to its trigger starts a compaction that rewrites level 0
        // and the overlapping part of level 1, which the pending estimate does not count yet.
        let compaction = max(db.pendingCompactionBytes, min(db.tableFileBytes, Self.compactionHeadroomMaxBytes))
        let needed = 2 * (db.activeMemtableBytes + extra) + compaction + Self.checkpointHeadroomBytes
        guard free < needed else { return }
        throw WeftError(ENOSPC, "metadata disk of \(db.path) has \(free) bytes free and a checkpoint needs \(needed): "
                            + "no metadata change fits until space is freed (every acknowledged one is in the journal)")
    }

    /// Runs a read under the lock; in strict mode waits until every change promised durable that
    /// it may have seen is durable (data commits without `durable` never promised it).
    func read<T>(_ body: (Transaction) throws -> T) throws -> T {
        lock.lock()
        let result: T
        do {
            result = try body(Transaction(store: self))
            lock.unlock()
        } catch {
            lock.unlock()
            throw error
        }
        if durability == .strict { try groupCommit.waitDurable(groupCommit.latestPromised) }
        return result
    }

    /// Makes every change applied so far durable.
    public func sync() throws { try groupCommit.syncAll() }

    /// Whether RocksDB is writing files in the background (a copy of the volume taken meanwhile
    /// is not what a crash would leave; tests wait for false).
    public var hasBackgroundWork: Bool { db.backgroundWorkPending }

    /// Grows whenever a committed change drops chunk objects: garbage collection has work only
    /// if it changed since the collector last looked.
    public var garbageMade: UInt64 {
        lock.lock()
        defer { lock.unlock() }
        return garbageMadeCount
    }

    // MARK: sessions and open files

    public func openSession(agentName: String) -> SessionID {
        lock.lock()
        defer { lock.unlock() }
        let id = nextSession
        nextSession += 1
        sessions[id] = Session(agentName: agentName)
        return id
    }

    /// Whether `session` was opened and is not closed yet.
    public func isSessionOpen(_ session: SessionID) -> Bool {
        lock.lock()
        defer { lock.unlock() }
        return sessions[session] != nil
    }

    /// Drops a session's open-file references; unlinked files nobody holds open are reclaimed.
    public func closeSession(_ session: SessionID) throws {
        try mutate { t in
            guard let opens = sessions.removeValue(forKey: session)?.opens else { return }
            for (ino, count) in opens { try t.dropOpen(ino, count: count) }
        }
    }

    public var agentNames: [String] {
        lock.lock()
        defer { lock.unlock() }
        return sessions.keys.sorted().map { sessions[$0]!.agentName }
    }

    /// Reclaims every inode left unlinked-but-open by a previous run. Call once at start-up.
    public func reclaimOrphans() throws -> Int {
        var orphans: [InodeID] = []
        try db.scan(prefix: [Key.orphanTag]) { key, _ in
            var r = ByteReader(UnsafeRawBufferPointer(rebasing: key[1...]))
            orphans.append(try r.u64BE())
            return true
        }
        for ino in orphans {
            try mutate { t in
                t.batch.delete(Key.orphan(ino))
                if let record = try t.inodeIfPresent(ino), record.attributes.nlink == 0 { try t.reclaim(record) }
            }
        }
        if !orphans.isEmpty { logger.info("reclaimed \(orphans.count) unlinked inode(s) left open by a previous run") }
        return orphans.count
    }

    public var currentCounters: (inodes: UInt64, logicalBytes: UInt64, nextSlice: UInt64) {
        lock.lock()
        defer { lock.unlock() }
        return (counters.inodes, counters.logicalBytes, counters.nextSlice)
    }
}
