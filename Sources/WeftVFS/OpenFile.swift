import CWeftSupport
import Foundation
import Synchronization
import WeftProto

/// Counts this agent's own unlinks and renames, which recall nothing of its own but may change
/// the link count and ctime of any file it keeps (which one is not known to the agent). Each
/// bump makes every file's cached attributes stale at once: a file's effective generation is
/// its own `generation` plus this count, and both only grow, so their sum changes with either.
final class OwnChanges: Sendable {
    private let count = Atomic<UInt64>(0)
    var value: UInt64 { count.load(ordering: .acquiring) }
    func bump() { count.add(1, ordering: .releasing) }
}

/// Buffered bytes not yet committed, at `offsetInChunk` of one chunk.
struct Extent {
    var offsetInChunk: UInt32
    var buffer: ExtentBuffer
}

/// Growable bytes of one extent. Buffers for writes that start a chunk are chunk-sized and come
/// from the VFS's `BufferPool` (memory already touched, reused without page faults; see
/// `adviseLargePages` for huge pages); small extents grow on demand.
final class ExtentBuffer {
    private(set) var pointer: UnsafeMutableRawPointer
    private(set) var capacity: Int
    private(set) var count = 0
    let pooled: Bool
    /// Pooled buffers: the end of the 2 MiB ranges already considered for huge pages.
    private var adviceConsideredBytes = 0

    init(capacity: Int, pooled: Bool, pointer: UnsafeMutableRawPointer? = nil) {
        self.capacity = capacity
        self.pooled = pooled
        self.pointer = pointer ?? (pooled ? LargePages.map(capacity, advised: false, for: "write buffer")
                                          : UnsafeMutableRawPointer.allocate(byteCount: max(capacity, 1), alignment: 4096))
    }

    var bytes: UnsafeRawBufferPointer { UnsafeRawBufferPointer(start: pointer, count: count) }

    /// Appends `piece`, growing (doubling) an unpooled buffer; a pooled one never needs to grow
    /// because it already spans to the chunk's end.
    func append(_ piece: UnsafeRawBufferPointer) {
        append(count: piece.count) { $0.copyMemory(from: piece) }
    }

    /// Appends `bytes` bytes that `fill` writes into the buffer's memory; if `fill` throws,
    /// nothing is appended.
    func append(count bytes: Int, fill: (UnsafeMutableRawBufferPointer) throws -> Void) rethrows {
        if count + bytes > capacity {
            precondition(!pooled, "a pooled extent buffer spans to its chunk's end")
            let grown = max(count + bytes, capacity * 2)
            let fresh = UnsafeMutableRawPointer.allocate(byteCount: grown, alignment: 4096)
            fresh.copyMemory(from: pointer, byteCount: count)
            pointer.deallocate()
            pointer = fresh
            capacity = grown
        }
        if pooled { adviseLargePages(from: count, bytes: bytes) }
        try fill(UnsafeMutableRawBufferPointer(start: pointer + count, count: bytes))
        count += bytes
    }

    /// A pooled buffer is mapped 2 MiB-aligned but not advised (`LargePages.map`). Each 2 MiB
    /// range is advised for huge pages (SPEC.md §7, Slab memory) when a write of at least
    /// `largeWriteBytes` is the first to reach it, before the write touches it: a stream of
    /// large writes then goes to the disk from 2 MiB pages, while a buffer that only takes a
    /// small write keeps small pages and holds what was written (a huge page faulted in for a
    /// 64 KiB write would hold 2 MiB of memory that the write-buffer bound does not count).
    /// Appends are sequential, so a range is considered once, when the write that reaches it
    /// begins at or before its start.
    private func adviseLargePages(from start: Int, bytes: Int) {
        let range = LargePages.bytes
        var next = max(adviceConsideredBytes, (start + range - 1) / range * range)
        while next < start + bytes, next + range <= capacity {
            if bytes >= Self.largeWriteBytes { LargePages.advise(pointer + next, range) }
            next += range
        }
        adviceConsideredBytes = max(adviceConsideredBytes, next)
    }

    /// FUSE's largest write (max_write): a sequential writer of large blocks sends these.
    static let largeWriteBytes = 1 << 20

    /// Hands the memory of a pooled buffer back (the buffer must not be used afterwards).
    func takePointer() -> UnsafeMutableRawPointer {
        let taken = pointer
        capacity = 0
        count = 0
        return taken
    }

    deinit {
        guard capacity > 0 else { return }
        if pooled { LargePages.unmap(pointer, capacity) } else { pointer.deallocate() }
    }
}

/// Chunk-sized buffers kept for reuse, at most `maxBuffers` (their memory is part of the write
/// buffer bound). On this class of VM touching fresh memory costs more than the copy itself.
final class BufferPool: @unchecked Sendable {
    private let lock = NSLock()
    private var free: [UnsafeMutableRawPointer] = []
    let bufferBytes: Int
    let maxBuffers: Int

    init(bufferBytes: Int, maxBuffers: Int) {
        self.bufferBytes = bufferBytes
        self.maxBuffers = maxBuffers
    }

    func take() -> ExtentBuffer {
        lock.lock()
        let reused = free.popLast()
        lock.unlock()
        return ExtentBuffer(capacity: bufferBytes, pooled: true, pointer: reused)
    }

    /// Buffers waiting in the pool to be taken again.
    var idleCount: Int { lock.withLock { free.count } }

    func give(_ buffer: ExtentBuffer) {
        guard buffer.pooled else { return }
        let pointer = buffer.takePointer()
        lock.lock()
        if free.count < maxBuffers {
            free.append(pointer)
            lock.unlock()
        } else {
            lock.unlock()
            LargePages.unmap(pointer, bufferBytes)
        }
    }

    deinit { free.forEach { LargePages.unmap($0, bufferBytes) } }

}

/// A whole chunk taken out of a file's write buffer for a background upload (SPEC.md §7,
/// Write-behind). Guarded by its file's `lock`.
final class StagedChunk {
    let index: UInt32
    /// In write order; nobody appends to them any more.
    let extents: [Extent]
    /// Until the upload ends.
    var running = true
    /// The slices to commit, once uploaded; nil before, or after a failed upload.
    var uploaded: [SliceCommit]?
    /// `VFS.uploadEpoch` when the upload began: uploads of an older epoch are in doubt and
    /// are written again before they are committed.
    var uploadEpoch: UInt64 = 0

    init(index: UInt32, extents: [Extent]) {
        self.index = index
        self.extents = extents
    }
}

/// The agent's state for one open inode, shared by all its handles: last known attributes,
/// cached layouts and the write-back buffer. Guarded by `lock` (a condition: a commit waits on
/// it for the file's background uploads).
final class OpenFile {
    let ino: InodeID
    let lock = NSCondition()
    var attributes: Attributes
    var handles = 0
    /// Uncommitted writes per chunk index, in write order (later extents cover earlier ones).
    var dirty: [UInt32: [Extent]] = [:]
    /// Whole chunks taken out of `dirty` to upload in the background, in staging order; they
    /// commit before anything still in `dirty`.
    var staged: [StagedChunk] = []
    /// Staged chunks whose upload is running.
    var uploadsRunning = 0
    /// The uploaded chunks at the front of `staged` that a background commit is committing
    /// (SPEC.md §7, Write-behind); they stay at the front until it ends.
    var prefixCommit: [StagedChunk]?
    /// Whether that commit's task has begun (before, a waiting commit takes the chunks back).
    var prefixCommitStarted = false
    /// Numbers background commits, so that a task whose commit was taken back does nothing.
    var prefixCommitToken: UInt64 = 0
    /// Commits waiting for this file's uploads: no chunk is staged meanwhile, so they wait for
    /// a bounded number.
    var commitsWaiting = 0
    /// Buffered bytes, staged ones included (they count against the write-buffer bound until
    /// their commit).
    var dirtyBytes = 0
    /// Largest end offset of any uncommitted write.
    var dirtyEnd: UInt64 = 0
    var dirtyMtimeNs: Int64 = 0
    /// When the oldest uncommitted write was buffered (0 when clean).
    var dirtySinceNs: Int64 = 0
    /// Failed commits in a row, and when the background commit may try again (monotonic ns).
    var commitFailures = 0
    var nextCommitAttemptNs: UInt64 = 0
    /// Cached slice lists, valid for `attributes.dataVersion`.
    var layouts: [UInt32: [Slice]] = [:]
    /// The data version the kernel's page cache holds for this inode.
    var kernelCacheVersion: UInt64 = 0
    /// The serial of this file's last close among the kept files (`KeptFiles`), 0 when it is
    /// not kept. Guarded by the VFS lock.
    var keptSerial: UInt64 = 0

    // Lease state (SPEC.md §12.6), guarded by `leaseLock`, never by `lock`: a recall must not
    // wait for a thread that holds `lock` while it waits on the hub.
    let leaseLock = NSLock()
    /// Bumped by every recall, notice and loss of leases. Read it through `effectiveGeneration`.
    var generation: UInt64 = 0
    /// Bumped by every recall and loss of leases (not by notices): a reply overtaken by a notice
    /// only may be fetched again at once (`Reader.layoutLocked`).
    var recalls: UInt64 = 0
    let ownChanges: OwnChanges
    /// True while this agent holds the file's write lease (or the hub grants no leases):
    /// writes are buffered. False: each write is committed before it returns (write-through).
    var writeLeased: Bool
    /// The `effectiveGeneration` at which `attributes` and `layouts` were fetched under a lease.
    var freshGeneration: UInt64 = 0
    /// The write lease was lost with the connection: reclaim it on the next one.
    var reclaim = false
    /// Handles opened under a lease without telling the home (SPEC.md §12.6): registered there
    /// by the recall that precedes a change that could remove the file.
    var localHandles: [FileHandle] = []
    /// `security.*` extended attributes read under the lease (nil: the home said ENODATA), with
    /// the `effectiveGeneration` they were read at; valid only while it is still current.
    private var securityXattrs: [[UInt8]: (value: [UInt8]?, generation: UInt64)] = [:]
    /// The `effectiveGeneration` at which this agent created the file, which then had no
    /// extended attributes (nil if it did not, or cannot know).
    private var createdBareAt: UInt64?
    static let cachedXattrsMax = 8
    static let cachedXattrBytesMax = 4096

    init(attributes: Attributes, writeLeased: Bool, ownChanges: OwnChanges) {
        ino = attributes.ino
        self.attributes = attributes
        self.writeLeased = writeLeased
        self.ownChanges = ownChanges
        // Fresh from the reply it was made from (the caller marks it stale if a recall overtook
        // that reply); own changes before now are already in it.
        freshGeneration = ownChanges.value
    }

    /// `generation` plus the agent's own changes; call with `leaseLock` held.
    var effectiveGeneration: UInt64 { generation &+ ownChanges.value }
    var currentGeneration: UInt64 { leaseLock.withLock { effectiveGeneration } }
    /// `effectiveGeneration` and `recalls` together.
    var leaseSnapshot: (generation: UInt64, recalls: UInt64) { leaseLock.withLock { (effectiveGeneration, recalls) } }
    var isWriteLeased: Bool { leaseLock.withLock { writeLeased } }
    /// Cached attributes and layouts are still covered by a lease.
    var isFresh: Bool { leaseLock.withLock { freshGeneration == effectiveGeneration } }

    /// Marks what was fetched by a call that began at generation `snapshot` as cacheable, unless
    /// a recall (or an own change) came in between.
    func markFresh(since snapshot: UInt64) {
        leaseLock.withLock { if effectiveGeneration == snapshot { freshGeneration = snapshot } }
    }

    /// What was cached is no longer covered by a lease.
    func invalidate() {
        leaseLock.withLock { generation &+= 1 }
    }

    /// A recall or loss of leases: nothing cached stays fresh, buffering stops. Returns whether
    /// the file was write-leased; if so and `committing`, the caller commits the buffered writes
    /// and then calls `recallCommitEnded` (`waitForRecallCommits` waits for it from now on).
    func revoke(committing: Bool = false) -> Bool {
        leaseLock.withLock {
            generation &+= 1
            recalls &+= 1
            let was = writeLeased
            writeLeased = false
            if was && committing { recallCommits.withLock { recallCommitsRunning += 1 } }
            return was
        }
    }

    /// Commits of buffered writes that recalls of the write lease started (`revoke(committing:)`)
    /// and that have not ended. Guarded by `recallCommits`.
    private var recallCommitsRunning = 0
    private let recallCommits = NSCondition()

    func recallCommitEnded() {
        recallCommits.withLock {
            recallCommitsRunning -= 1
            recallCommits.broadcast()
        }
    }

    /// Waits until no commit that a recall of the write lease started is running. Another
    /// recall of the same file (the home recalls a lease once per change that needs it, and
    /// several may be under way) must not be answered before the buffered writes are at the
    /// home: its answer would let the home read the file without them. Only the holder's own
    /// commit is waited for, which waits for no recall (no other session holds a lease on a
    /// write-leased file).
    func waitForRecallCommits() {
        recallCommits.withLock {
            while recallCommitsRunning > 0 { recallCommits.wait() }
        }
    }

    /// A `security.*` attribute read under the lease with no recall or own change since:
    /// `.some(nil)` for one the home does not have, nil when nothing valid is cached.
    func cachedSecurityXattr(_ name: [UInt8]) -> [UInt8]?? {
        leaseLock.withLock {
            guard freshGeneration == effectiveGeneration else { return nil }
            if let entry = securityXattrs[name] {
                if entry.generation == effectiveGeneration { return .some(entry.value) }
                securityXattrs.removeAll()   // all older than the current generation
            }
            return createdBareAt == effectiveGeneration ? .some(nil) : nil
        }
    }

    /// This agent created the file by a call that began at generation `snapshot`: it has no
    /// extended attributes, for as long as no recall or own change comes.
    func markCreatedBare(since snapshot: UInt64) {
        leaseLock.withLock {
            if effectiveGeneration == snapshot && freshGeneration == snapshot { createdBareAt = snapshot }
        }
    }

    /// Keeps what a getxattr that began at generation `snapshot` got (nil: ENODATA), unless a
    /// recall or own change came in between, or the file's attributes are not under a lease.
    func cacheSecurityXattr(_ name: [UInt8], _ value: [UInt8]?, since snapshot: UInt64) {
        leaseLock.withLock {
            guard effectiveGeneration == snapshot, freshGeneration == snapshot,
                  (value?.count ?? 0) <= Self.cachedXattrBytesMax else { return }
            if securityXattrs.contains(where: { $0.value.generation != snapshot }) { securityXattrs.removeAll() }
            guard securityXattrs[name] != nil || securityXattrs.count < Self.cachedXattrsMax else { return }
            securityXattrs[name] = (value, snapshot)
        }
    }

    var hasDirtyData: Bool { !dirty.isEmpty || !staged.isEmpty }

    /// Attributes as this agent sees them: committed ones, extended by buffered writes.
    var visibleAttributes: Attributes {
        var visible = attributes
        if hasDirtyData {
            visible.size = max(visible.size, dirtyEnd)
            visible.allocatedBytes += UInt64(dirtyBytes)
            visible.mtimeNs = max(visible.mtimeNs, dirtyMtimeNs)
            visible.ctimeNs = max(visible.ctimeNs, dirtyMtimeNs)
        }
        return visible
    }

    /// Adopts attributes from the hub; a new data version invalidates cached layouts.
    /// Attributes fetched before a newer commit of this agent are ignored (a reply may arrive
    /// after the commit that superseded it).
    func adopt(_ fresh: Attributes) {
        guard fresh.dataVersion >= attributes.dataVersion else { return }
        if fresh.dataVersion != attributes.dataVersion { layouts.removeAll(keepingCapacity: true) }
        attributes = fresh
    }

    /// Buffers `data` at file offset `offset`, split at chunk boundaries.
    /// Buffers `count` bytes at `offset`, which `fill` copies in order into the extents' memory,
    /// one piece per chunk. Returns the bytes buffered: all of them, or, if `fill` throws, those
    /// of the pieces before (the error is returned with them, for a short write).
    @discardableResult
    func buffer(count: Int, at offset: UInt64, chunkSizeBytes: Int, pool: BufferPool,
                fill: (UnsafeMutableRawBufferPointer) throws -> Void) -> (buffered: Int, error: Error?) {
        var position = 0
        var failure: Error?
        while position < count {
            let fileOffset = offset + UInt64(position)
            let index = UInt32(fileOffset / UInt64(chunkSizeBytes))
            let offsetInChunk = Int(fileOffset % UInt64(chunkSizeBytes))
            let take = min(count - position, chunkSizeBytes - offsetInChunk)
            do {
                // Append in place when the write continues the last extent (no copy of the buffer).
                if let last = dirty[index]?.last, Int(last.offsetInChunk) + last.buffer.count == offsetInChunk {
                    try last.buffer.append(count: take, fill: fill)
                } else {
                    // A write that can grow to a whole chunk gets a pooled buffer reaching the chunk's end.
                    let buffer = offsetInChunk == 0 && take >= 64 * 1024 && pool.bufferBytes == chunkSizeBytes
                        ? pool.take()
                        : ExtentBuffer(capacity: max(take, 4096), pooled: false)
                    do { try buffer.append(count: take, fill: fill) } catch {
                        if buffer.pooled { pool.give(buffer) }
                        throw error
                    }
                    dirty[index, default: []].append(Extent(offsetInChunk: UInt32(offsetInChunk), buffer: buffer))
                }
            } catch {
                failure = error
                break
            }
            position += take
        }
        guard position > 0 else { return (0, failure) }
        if dirtyBytes == 0 { dirtySinceNs = currentTimeNs() }
        dirtyBytes += position
        dirtyEnd = max(dirtyEnd, offset + UInt64(position))
        dirtyMtimeNs = currentTimeNs()
        return (position, failure)
    }

    /// Moves chunk `index` to `staged` if its buffered bytes reach a whole chunk, unless a commit
    /// is waiting for the uploads. Returns the staged chunk, counted as running.
    func stageIfFull(_ index: UInt32, chunkSizeBytes: Int) -> StagedChunk? {
        guard commitsWaiting == 0, let extents = dirty[index],
              extents.reduce(0, { $0 + $1.buffer.count }) >= chunkSizeBytes else { return nil }
        dirty[index] = nil
        let chunk = StagedChunk(index: index, extents: extents)
        staged.append(chunk)
        uploadsRunning += 1
        return chunk
    }

    /// Waits (releasing `lock`) until no upload and no background commit of this file runs.
    /// Call with `lock` held.
    func waitForUploads() {
        commitsWaiting += 1
        while true {
            // A background commit whose task has not begun (its pool is busy with other files'
            // commits) is taken back: the caller commits those chunks itself.
            if prefixCommit != nil && !prefixCommitStarted { prefixCommit = nil }
            if uploadsRunning == 0 && prefixCommit == nil { break }
            lock.wait()
        }
        commitsWaiting -= 1
    }

    /// Records the end of `chunk`'s upload and wakes waiting commits. Call with `lock` held.
    func uploadEnded(_ chunk: StagedChunk, slices: [SliceCommit]?, epoch: UInt64) {
        chunk.uploaded = slices
        chunk.uploadEpoch = epoch
        chunk.running = false
        uploadsRunning -= 1
        lock.broadcast()
    }
}

/// One open file handle.
final class FileHandle {
    let file: OpenFile
    let flags: Int32
    let context: RequestContext
    let lock = NSLock()
    /// False for a read-only open served under a lease without a call to the home, until a
    /// recall registers it there (guarded by `file.leaseLock`).
    var registered = true
    /// End of the previous read, to detect sequential access.
    var lastReadEnd: UInt64 = 0
    var readaheadWindowBytes: UInt64 = 0
    var prefetchedUpTo: UInt64 = 0
    /// Read-ahead fetches waiting to start, in file order, and how many run (guarded by `lock`).
    var prefetchPending: [ResolvedRange] = []
    var prefetchRunning = 0

    init(file: OpenFile, flags: Int32, context: RequestContext) {
        self.file = file
        self.flags = flags
        self.context = context
    }
}

/// One open directory: entries fetched page by page; a readdir offset is an index into them.
final class DirectoryHandle {
    let ino: InodeID
    let context: RequestContext
    /// The directory's attributes when it was opened: what `fstat` of the handle shows once
    /// the directory is removed (with no links), as a local file system does; `fchmod`,
    /// `fchown` and `futimens` of the removed directory change them (`lock`).
    var attributes: Attributes
    let lock = NSLock()
    var entries: [DirectoryEntry] = []
    var complete = false

    init(ino: InodeID, context: RequestContext, attributes: Attributes) {
        self.ino = ino
        self.context = context
        self.attributes = attributes
    }
}
