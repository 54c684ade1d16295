import Foundation
import Logging
import WeftMeta
import WeftProto

/// Background work of a hub: deleting chunk objects nothing references (garbage collection)
/// and compacting long slice lists into one object, so reads stay cheap after many small writes.
final class Maintenance: @unchecked Sendable {
    weak var hub: Hub?
    private let logger: Logger
    private let condition = NSCondition()
    private var pendingCompactions: [CompactionKey] = []
    /// Objects compaction has allocated and not yet swapped in or deleted (fsck must not take
    /// them for orphans).
    private var compacting: Set<SliceID> = []
    private var queued: Set<CompactionKey> = []
    private var wakeups = 0
    private var running = false
    private var thread: Thread?
    /// Most compactions waiting at once; more are dropped (the next commit re-queues them).
    private let compactionQueueMax = 4096
    private let garbageBatch = 1024
    /// Holder hubs whose deletes failed, and when to try them again (maintenance thread only).
    private var holderRetryAfter: [UInt16: Date] = [:]
    static let holderRetrySeconds: TimeInterval = 30
    /// When to sweep co-located agents' temporary files, and when a co-located writer's session
    /// last ended (under `condition`; `sweepAgentTemporaries`).
    private var temporarySweepAt: Date?
    private var writerEndedAt: Date?
    /// How long after a co-located writer's session ends its temporary files are swept, and how
    /// old a file must be to go: fsck's grace for orphans, so that a file written just before
    /// the session ended is that old by then. Tests shorten it.
    var temporaryGraceSeconds: TimeInterval {
        get { condition.withLock { temporaryGrace } }
        set { condition.withLock { temporaryGrace = newValue } }
    }
    private var temporaryGrace = TimeInterval(Fsck.orphanGraceNs / 1_000_000_000)

    struct CompactionKey: Hashable {
        var ino: InodeID
        var chunkIndex: UInt32
    }

    init(logger: Logger) {
        self.logger = logger
    }

    func start() {
        condition.lock()
        defer { condition.unlock() }
        guard !running else { return }
        running = true
        let thread = Thread { [weak self] in self?.loop() }
        thread.name = "weft-hub-maintenance"
        self.thread = thread
        thread.start()
    }

    func stop() {
        condition.lock()
        running = false
        condition.broadcast()
        condition.unlock()
        while thread?.isFinished == false { usleep(1000) }
    }

    /// A co-located writer's session ended: sweeps agents' temporary files older than the grace
    /// once the grace has passed (one sweep for sessions that end meanwhile, another for those
    /// that end after it is due).
    func sweepAgentTemporaries() {
        condition.lock()
        defer { condition.unlock() }
        let now = Date()
        writerEndedAt = now
        if temporarySweepAt == nil { temporarySweepAt = now.addingTimeInterval(temporaryGrace + 1) }
    }

    /// Runs the sweep if it is due (maintenance thread).
    private func sweepAgentTemporariesIfDue() {
        condition.lock()
        guard let due = temporarySweepAt, Date() >= due else {
            condition.unlock()
            return
        }
        let grace = temporaryGrace
        // A session that ended less than the grace ago may have left younger files: another sweep.
        temporarySweepAt = writerEndedAt.flatMap { ended in
            ended.addingTimeInterval(grace) > due ? ended.addingTimeInterval(grace + 1) : nil
        }
        condition.unlock()
        do {
            try hub?.removeAgentTemporaries(olderThanNs: Int64(grace * 1_000_000_000))
        } catch {
            logger.error("sweep of co-located agents' temporary files failed (fsck --repair removes them): \(error)")
        }
    }

    func wake() {
        condition.lock()
        wakeups += 1
        condition.signal()
        condition.unlock()
    }

    /// `MetaStore.garbageMade` when the collector was last woken for it.
    private var garbageSeen: UInt64 = 0

    /// Wakes the collector if a change made garbage since it was last woken for garbage (the
    /// hub calls this after every change that may drop objects; most drop none, and waking a
    /// thread for each would cost more than the change).
    func wakeIfGarbage(_ garbageMade: UInt64) {
        condition.lock()
        defer { condition.unlock() }
        guard garbageMade != garbageSeen else { return }
        garbageSeen = garbageMade
        wakeups += 1
        condition.signal()
    }

    func considerCompaction(ino: InodeID, chunkIndexes: Set<UInt32>) {
        guard let hub else { return }
        var keys: [CompactionKey] = []
        for index in chunkIndexes {
            if let (_, lists) = try? hub.meta.layout(ino: ino, firstChunk: index, count: 1),
               lists[0].count > Hub.compactionThresholdSlices {
                keys.append(CompactionKey(ino: ino, chunkIndex: index))
            }
        }
        guard !keys.isEmpty else { return }
        condition.lock()
        for key in keys where !queued.contains(key) && pendingCompactions.count < compactionQueueMax {
            queued.insert(key)
            pendingCompactions.append(key)
        }
        condition.signal()
        condition.unlock()
    }

    private func loop() {
        while true {
            condition.lock()
            if running && pendingCompactions.isEmpty && wakeups == 0 {
                _ = condition.wait(until: Date().addingTimeInterval(1))
            }
            if !running {
                condition.unlock()
                return
            }
            wakeups = 0
            let compactions = pendingCompactions
            pendingCompactions.removeAll()
            queued.removeAll()
            condition.unlock()
            for key in compactions { compact(key) }
            collectGarbage()
            syncJournaledObjects()
            sweepAgentTemporariesIfDue()
        }
    }

    /// Syncs the objects whose bytes the metadata journal carries, and deletes their keys.
    private func syncJournaledObjects() {
        do {
            try hub?.syncJournaledObjects()
        } catch {
            logger.error("sync of chunk objects the journal carries failed (their keys stay; checked at the next open): \(error)")
        }
    }

    /// Deletes chunk objects whose last reference is durably gone: here, or at the hub that
    /// holds them (`Hub.deleteAtHolder`; kept for the next pass while that hub cannot be
    /// reached, so that local garbage behind them is still collected).
    func collectGarbage() {
        guard let hub else { return }
        do {
            var after: SliceID = 0
            let now = Date()
            var unreachable = Set(holderRetryAfter.filter { $0.value > now }.keys)
            while true {
                let batch = try hub.meta.garbage(after: after, limit: garbageBatch)
                guard let last = batch.last else { return }
                var done: [SliceID] = []
                var elsewhere: [UInt16: [SliceID]] = [:]
                for object in batch {
                    if object.holder == 0 {
                        try hub.chunks.delete(id: object.id)
                        done.append(object.id)
                    } else {
                        elsewhere[object.holder, default: []].append(object.id)
                    }
                }
                for (holder, ids) in elsewhere.sorted(by: { $0.key < $1.key }) where !unreachable.contains(holder) {
                    guard let deleteAtHolder = hub.deleteAtHolder else { break }
                    do {
                        try deleteAtHolder(holder, ids)
                        done += ids
                    } catch {
                        unreachable.insert(holder)
                        holderRetryAfter[holder] = now.addingTimeInterval(Self.holderRetrySeconds)
                        logger.warning("cannot delete chunk objects at hub \(holder) yet, will retry in \(Int(Self.holderRetrySeconds)) s: \(error)")
                    }
                }
                // The deletes must be durable before their keys go: a key lost first would
                // leave an object no file references and no key names.
                try hub.chunks.syncRemovals()
                try hub.meta.forgetGarbage(done)
                if batch.count < garbageBatch { return }
                after = last.id
            }
        } catch {
            logger.error("garbage collection failed: \(error)")
        }
    }

    /// Objects compaction is writing and has not swapped in or deleted yet.
    func compactingObjects() -> Set<SliceID> {
        condition.withLock { compacting }
    }

    /// Rewrites one chunk's visible bytes as a single object and swaps it in atomically.
    private func compact(_ key: CompactionKey) {
        guard let hub else { return }
        do {
            let (_, lists) = try hub.meta.layout(ino: key.ino, firstChunk: key.chunkIndex, count: 1)
            let slices = lists[0]
            // Objects held by other hubs are not read here: such a chunk is left as it is.
            guard slices.count > 1, slices.allSatisfy({ $0.hub == 0 }) else { return }
            let start = slices.map(\.offsetInChunk).min()!
            let end = slices.map { $0.offsetInChunk + $0.length }.max()!
            var data = [UInt8](repeating: 0, count: Int(end - start))
            for segment in overlaySlices(slices, start: start, end: end) where segment.sliceID != 0 {
                let bytes = try hub.chunks.read(id: segment.sliceID, offset: Int(segment.objectOffset),
                                                length: Int(segment.length))
                let at = Int(segment.offsetInChunk - start)
                data.replaceSubrange(at..<at + bytes.count, with: bytes)
            }
            let id = try hub.meta.allocateSliceIDs(count: 1)
            condition.withLock { _ = compacting.insert(id) }
            defer { condition.withLock { _ = compacting.remove(id) } }
            try data.withUnsafeBytes { try hub.chunks.write(id: id, data: $0) }
            // Durable before the swap: the swap marks the old objects garbage, and a journal
            // sync may make it durable before any chunk pass took the new object (SPEC.md §5);
            // a power loss then would leave the chunk naming a lost object, its old data deleted.
            try hub.chunks.sync()
            guard hub.chunks.lostObjects([id]).isEmpty else {   // another caller's pass failed on it
                try? hub.chunks.delete(id: id)
                throw WeftError(EIO, "the compacted object \(id) could not be made durable")
            }
            hub.testBeforeCompactionSwap?(id)
            let replacement = Slice(id: id, offsetInChunk: start, length: end - start, sliceOffset: 0,
                                    objectLength: UInt32(data.count))
            if try !hub.meta.replaceSlices(ino: key.ino, chunkIndex: key.chunkIndex, expectedPrefix: slices,
                                           replacement: replacement) {
                try hub.chunks.delete(id: id)
            }
        } catch let error as WeftError where error.errno == ENOENT || error.errno == EINVAL {
            return  // the file went away meanwhile
        } catch {
            logger.error("compaction of inode \(key.ino) chunk \(key.chunkIndex) failed: \(error)")
        }
    }
}
