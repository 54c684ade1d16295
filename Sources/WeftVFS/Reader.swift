import Foundation
import WeftProto

/// The bytes of one read, as pieces of cached blocks (no copy until the kernel takes them).
public struct ReadResult {
    public struct Piece {
        public let block: CachedBlock
        public let offset: Int
        public let length: Int
    }
    public var pieces: [Piece] = []
    public var count: Int { pieces.reduce(0) { $0 + $1.length } }

    /// Copies the bytes into one array (tests and the native API use this).
    public func bytes() -> [UInt8] {
        var out: [UInt8] = []
        out.reserveCapacity(count)
        for piece in pieces {
            out.append(contentsOf: UnsafeRawBufferPointer(start: piece.block.pointer + piece.offset, count: piece.length))
        }
        return out
    }
}

/// A stretch of a file resolved to a chunk object range or a hole.
struct ResolvedRange {
    var sliceID: SliceID
    var objectOffset: Int
    var objectLength: Int
    var length: Int
    /// Hub holding the object (0 = the home).
    var holder: UInt16 = 0
}

extension VFS {
    public func read(handle id: UInt64, offset: UInt64, size: Int) throws -> ReadResult {
        let handle = try fileHandle(id)
        let accessMode = handle.flags & O_ACCMODE
        guard accessMode == O_RDONLY || accessMode == O_RDWR else { throw WeftError(EBADF) }
        let file = handle.file
        var attempt = 0
        while true {
            attempt += 1
            let ranges = try resolve(file, context: handle.context, offset: offset, size: size, flushFirst: true)
            let end = offset + UInt64(ranges.reduce(0) { $0 + $1.length })
            let sequential = scheduleReadahead(handle, readOffset: offset, readEnd: end)
            var result = ReadResult()
            result.pieces.reserveCapacity(ranges.count * 2)
            do {
                for range in ranges { try fetch(range, context: handle.context, wholeObject: sequential, into: &result) }
                return result
            } catch let error as WeftError where error.errno == ENOENT && attempt == 1 {
                // The cached layout names an object the hub has since replaced (compaction, or
                // another agent's overwrite): fetch the current layout and read again.
                file.lock.lock()
                file.layouts.removeAll()
                file.lock.unlock()
                logger.debug("re-reading inode \(file.ino) with a fresh layout: \(error)")
            }
        }
    }

    /// Maps `[offset, offset+size)` (clamped to the file size) onto chunk objects and holes.
    func resolve(_ file: OpenFile, context: RequestContext, offset: UInt64, size: Int,
                 flushFirst: Bool) throws -> [ResolvedRange] {
        file.lock.lock()
        defer { file.lock.unlock() }
        if file.hasDirtyData {
            guard flushFirst else { return [] }
            try flushLocked(file, context: context, durable: false)
        }
        // Lists fetched for this read that no lease covers (not kept in `file.layouts`).
        var uncovered: [UInt32: [Slice]] = [:]
        if !file.isFresh {
            // A recall (or a lost lease) came since the attributes were fetched: the size and
            // layouts may be stale. Fetch them again (this also takes a new lease).
            file.layouts.removeAll()
            _ = try layoutLocked(file, context: context, index: UInt32(offset / UInt64(chunkSizeBytes)),
                                 uncovered: &uncovered)
        }
        let fileSize = file.attributes.size
        guard offset < fileSize, size > 0 else { return [] }
        let end = min(fileSize, offset + UInt64(size))
        let chunkSize = UInt64(chunkSizeBytes)
        var ranges: [ResolvedRange] = []
        var position = offset
        while position < end {
            let index = UInt32(position / chunkSize)
            let chunkStart = UInt64(index) * chunkSize
            let startInChunk = UInt32(position - chunkStart)
            let endInChunk = UInt32(min(end, chunkStart + chunkSize) - chunkStart)
            let slices = try layoutLocked(file, context: context, index: index, uncovered: &uncovered)
            for segment in overlaySlices(slices, start: startInChunk, end: endInChunk) {
                ranges.append(ResolvedRange(sliceID: segment.sliceID, objectOffset: Int(segment.objectOffset),
                                            objectLength: Int(segment.objectLength), length: Int(segment.length),
                                            holder: segment.hub))
            }
            position = chunkStart + UInt64(endInChunk)
        }
        return ranges
    }

    /// The slice list of one chunk, from the layout cache or the hub (8 chunks at a time).
    ///
    /// A reply that a notice overtook (a change of the file was under way at the home, which
    /// therefore granted no lease) is fetched again, after a short pause, up to
    /// `overtakenFetchesMax` times: the kernel caches the pages this read fills, and pages no
    /// lease covers would outlive the change, which does not wait for this agent (SPEC.md §12.6,
    /// "Reads that a change overtakes"). A reply that a recall overtook is used as it is: the
    /// recall's answer waits for this read's pages and drops them.
    func layoutLocked(_ file: OpenFile, context: RequestContext, index: UInt32,
                      uncovered: inout [UInt32: [Slice]]) throws -> [Slice] {
        if let cached = file.layouts[index] ?? uncovered[index] { return cached }
        let batch = Self.layoutBatch
        var fetches = 0
        while true {
            let before = file.leaseSnapshot
            let (attributes, lists) = try hub.layout(context, ino: file.ino, firstChunk: index, count: batch)
            fetches += 1
            file.adopt(attributes)
            if attributes.dataVersion == file.attributes.dataVersion { file.attributes.size = attributes.size }
            let after = file.leaseSnapshot
            Trace.note("layout ino=\(file.ino) chunk=\(index) size=\(attributes.size) dv=\(attributes.dataVersion) "
                       + "slices=\(lists.first?.count ?? 0) generation=\(before.generation)->\(after.generation)")
            if after.generation == before.generation {
                for (offset, list) in lists.enumerated() { file.layouts[index + UInt32(offset)] = list }
                file.markFresh(since: before.generation)
                return lists.first ?? []
            }
            // Overtaken: the lists serve this read only.
            guard after.recalls == before.recalls, fetches < Self.overtakenFetchesMax else {
                for (offset, list) in lists.enumerated() { uncovered[index + UInt32(offset)] = list }
                return lists.first ?? []
            }
            overtakenFetches.add(1, ordering: .relaxed)
            usleep(useconds_t(min(250 << fetches, 16_000)))
        }
    }

    /// Chunk lists one `layout` (or `openLayout`) call asks for.
    static let layoutBatch: UInt32 = 8

    /// How many times a layout overtaken by notices is fetched (about 80 ms of pauses in all).
    static let overtakenFetchesMax = 10

    /// Appends the blocks covering `range` to `result`, fetching missing ones (single flight).
    /// With `wholeObject` (sequential access), a miss also fetches the rest of the object in the
    /// same request, so the disk sees one large read instead of many small ones.
    ///
    /// The cache is asked about a whole stretch of blocks at once (one lock per stretch, not per
    /// 64 KiB block). At the first block another thread is fetching, the claims beyond it are
    /// given back (others may fetch them meanwhile) before waiting for it, and the blocks after
    /// it are looked up again once it has arrived. Waits go in ascending block order, and a
    /// holder fetches its lower claims before it waits, so waits cannot form a cycle.
    func fetch(_ range: ResolvedRange, context: RequestContext, wholeObject: Bool = false,
               into result: inout ReadResult) throws {
        if range.sliceID == 0 {
            var remaining = range.length
            while remaining > 0 {
                let take = min(remaining, CachedBlock.zeros.length)
                result.pieces.append(.init(block: CachedBlock.zeros, offset: 0, length: take))
                remaining -= take
            }
            return
        }
        let blockSize = Limits.blockSizeBytes
        let object = range.sliceID
        let first = range.objectOffset / blockSize
        let last = (range.objectOffset + range.length - 1) / blockSize
        var blocks: [CachedBlock] = []
        blocks.reserveCapacity(last - first + 1)
        func key(_ block: Int) -> BlockCache.Key { BlockCache.Key(object: object, block: UInt32(block)) }
        func fetchRun(_ start: Int, _ count: Int, extra: Int = 0) throws {
            let fetched = try fetchBlocks(object: object, holder: range.holder, objectLength: range.objectLength,
                                          firstBlock: start, count: count + extra, context: context)
            blocks.append(contentsOf: fetched.prefix(count))
        }

        var next = first
        while next <= last {
            var found = cache.lookup(object: object, blocks: next...last)
            // Keep the claims only up to the first block another thread is fetching.
            let busy = found.firstIndex { if case .busy = $0 { return true } else { return false } }
            if let busy {
                let beyond = found[(busy + 1)...].indices.filter { if case .claimed = found[$0] { true } else { false } }
                cache.giveBack(beyond.map { key(next + $0) })
                found.removeSubrange((busy + 1)...)
            }
            var position = 0
            while position < found.count {
                switch found[position] {
                case .cached(let block):
                    blocks.append(block)
                    position += 1
                case .claimed:
                    var runEnd = position
                    while runEnd + 1 < found.count, case .claimed = found[runEnd + 1] { runEnd += 1 }
                    let start = next + position
                    let count = runEnd - position + 1
                    var extra = 0
                    let objectLastBlock = (range.objectLength - 1) / blockSize
                    if wholeObject && start + count - 1 == last && last < objectLastBlock {
                        // Extend the fetch over the object's following, uncached blocks.
                        extra = cache.tryClaimRun(object: object, from: last + 1, through: objectLastBlock)
                    }
                    do {
                        try fetchRun(start, count, extra: extra)
                    } catch {
                        // The failed fetch gave its own claims back; give back the ones after it.
                        let later = found[(runEnd + 1)...].indices.filter {
                            if case .claimed = found[$0] { true } else { false }
                        }
                        cache.giveBack(later.map { key(next + $0) })
                        // A damaged block beyond the request must not fail this read: retry
                        // without the extension (blocks fetched so far stay cached).
                        if extra > 0 { return try fetch(range, context: context, wholeObject: false, into: &result) }
                        throw error
                    }
                    position = runEnd + 1
                case .busy:
                    // No claims held here: wait for the other fetch (or take the block over).
                    let (cached, claimed) = cache.claim(key(next + position))
                    if let cached {
                        blocks.append(cached)
                    } else {
                        precondition(claimed)
                        try fetchRun(next + position, 1)
                    }
                    position += 1
                }
            }
            next += found.count
        }
        var skip = range.objectOffset - first * blockSize
        var remaining = range.length
        for block in blocks {
            let take = min(remaining, block.length - skip)
            if take <= 0 { throw WeftError(EIO, "chunk object \(range.sliceID) is shorter than its layout says") }
            result.pieces.append(.init(block: block, offset: skip, length: take))
            remaining -= take
            skip = 0
        }
    }

    /// Reads claimed blocks `[firstBlock, firstBlock+count)` of an object from the hub in one
    /// request and fills the cache. Releases the claims on failure.
    func fetchBlocks(object: SliceID, holder: UInt16 = 0, objectLength: Int, firstBlock: Int, count: Int,
                     context: RequestContext) throws -> [CachedBlock] {
        let blockSize = Limits.blockSizeBytes
        let start = firstBlock * blockSize
        let end = min(objectLength, (firstBlock + count) * blockSize)
        let keys = (firstBlock..<firstBlock + count).map { BlockCache.Key(object: object, block: UInt32($0)) }
        let slab = Slab(capacity: end - start, pool: cache.slabs)
        do {
            guard end > start else { throw WeftError(EIO, "read past the end of chunk object \(object)") }
            try hub.readSlice(context, id: object, offset: UInt32(start), holders: holder == 0 ? [] : [holder],
                              into: UnsafeMutableRawBufferPointer(start: slab.pointer, count: end - start))
        } catch {
            cache.abandon(keys)
            throw error
        }
        let blocks = keys.indices.map { position in
            let from = position * blockSize
            return CachedBlock(slab: slab, offset: from, length: min(end - start, from + blockSize) - from)
        }
        cache.fill(Array(zip(keys, blocks)))
        return blocks
    }

    /// Detects sequential reads and fetches ahead of them in the background, doubling the window
    /// up to `readaheadMaxBytes`.
    @discardableResult
    func scheduleReadahead(_ handle: FileHandle, readOffset: UInt64, readEnd: UInt64) -> Bool {
        let fileSize = handle.file.lock.withLock { handle.file.attributes.size }
        handle.lock.lock()
        // Kernel read-ahead sends several requests at once, so they may arrive slightly out of
        // order: a read starting near the previous end still counts as sequential.
        let slackBytes: UInt64 = 4 << 20
        let sequential = readEnd > readOffset && readOffset + slackBytes >= handle.lastReadEnd
            && readOffset <= handle.lastReadEnd + slackBytes
        handle.lastReadEnd = max(handle.lastReadEnd, readEnd)
        guard sequential else {
            handle.readaheadWindowBytes = 0
            handle.lock.unlock()
            return false
        }
        handle.readaheadWindowBytes = min(UInt64(options.readaheadMaxBytes),
                                          max(UInt64(chunkSizeBytes), handle.readaheadWindowBytes * 2))
        // Nothing past the end as the file has it now: a whole small file read at once (a
        // dataset sample) would otherwise wake a pool thread per file for an empty range. A
        // file that grows is read on by the next read, which schedules again.
        let target = min(readEnd + handle.readaheadWindowBytes, max(fileSize, readEnd))
        // Fetch in whole-chunk steps once at least half a chunk of the window is unfetched,
        // or whatever is left before the end.
        let from = max(handle.prefetchedUpTo, readEnd)
        guard target > from, target - from >= UInt64(chunkSizeBytes / 2) || target == fileSize else {
            handle.lock.unlock()
            return true
        }
        handle.prefetchedUpTo = target
        handle.lock.unlock()
        let file = handle.file
        let context = handle.context
        readaheadSteps.add(1, ordering: .relaxed)
        prefetchPool.async { [self] in
            guard let ranges = try? resolve(file, context: context, offset: from, size: Int(target - from),
                                            flushFirst: false) else { return }
            handle.lock.withLock { handle.prefetchPending += ranges.filter { $0.sliceID != 0 } }
            startPrefetches(handle)
        }
        return true
    }

    /// Most read-ahead fetches of one handle running at once. One stream gains from a few
    /// objects read in parallel, but with many the nearest object, which the reader waits for,
    /// comes later; the pool's threads serve several streams.
    static let prefetchesPerHandle = 3

    /// Starts the handle's waiting read-ahead fetches, nearest first, up to `prefetchesPerHandle`;
    /// each one that ends starts the next.
    func startPrefetches(_ handle: FileHandle) {
        let limit = Self.prefetchesPerHandle
        while true {
            let next: ResolvedRange? = handle.lock.withLock {
                guard handle.prefetchRunning < limit, !handle.prefetchPending.isEmpty else { return nil }
                handle.prefetchRunning += 1
                return handle.prefetchPending.removeFirst()
            }
            guard let next else { return }
            prefetchPool.async { [self] in
                prefetch(next, context: handle.context)
                handle.lock.withLock { handle.prefetchRunning -= 1 }
                startPrefetches(handle)
            }
        }
    }

    /// Fetches the uncached blocks of `range` without waiting on other fetches.
    func prefetch(_ range: ResolvedRange, context: RequestContext) {
        let blockSize = Limits.blockSizeBytes
        let first = range.objectOffset / blockSize
        let last = (range.objectOffset + range.length - 1) / blockSize
        var run: [Int] = []
        func flushRun() {
            guard let start = run.first else { return }
            _ = try? fetchBlocks(object: range.sliceID, holder: range.holder, objectLength: range.objectLength, firstBlock: start,
                                 count: run.count, context: context)
            run.removeAll()
        }
        for (offset, claimed) in cache.tryClaim(object: range.sliceID, blocks: first...last).enumerated() {
            if claimed {
                run.append(first + offset)
            } else {
                flushRun()
            }
        }
        flushRun()
    }
}
