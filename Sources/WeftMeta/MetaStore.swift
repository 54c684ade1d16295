import Foundation
import Logging
import WeftProto

/// When a metadata change is on stable storage relative to its reply.
public enum DurabilityMode: String, Sendable, CaseIterable {
    /// Every mutation's WAL record is fsynced (shared between concurrent mutations) before the reply.
    case strict
    /// The WAL is written before the reply (survives a process kill) and fsynced once a second.
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

    /// Runs before every WAL sync (the hub makes chunk data durable here).
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

    public init(path: String, durability: DurabilityMode, readOnly: Bool = false, logger: Logger) throws {
        db = try RocksDB(path: path, createIfMissing: false, readOnly: readOnly)
        self.durability = durability
        self.logger = logger
        guard let volumeBytes = try db.get(Key.volume) else { throw WeftError(EINVAL, "\(path) holds no Weft volume") }
        volume = try volumeBytes.decode { try VolumeInfo.decode(from: &$0) }
        guard volume.formatVersion == 1 else {
            throw WeftError(EINVAL, "unsupported volume format version \(volume.formatVersion)")
        }
        guard let counterBytes = try db.get(Key.counters) else { throw WeftError(EIO, "volume counters missing") }
        counters = try Counters.decode(counterBytes)
        let database = db
        groupCommit = GroupCommit(syncWAL: { try database.flushWAL(sync: true) })
        if durability == .periodic && !readOnly {
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
        try groupCommit.syncAll()
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
                try db.write(transaction.batch, sync: false)
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
