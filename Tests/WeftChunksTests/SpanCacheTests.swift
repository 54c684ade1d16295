#if canImport(Glibc)
import Glibc
#endif
import Foundation
import WeftChunks
import WeftProto
import WeftTestSupport
import XCTest

/// The hub's read cache (SPEC.md §4, Hub read cache): `storedBlocks` gives a qualifying span's
/// bytes in memory, read once for every reader, bounded, its memory reused; anything else, and a
/// span whose read fails, goes from the file as before.
final class SpanCacheTests: ChunkTestCase {
    let b = Limits.blockSizeBytes

    /// The stored bytes of `blocks` as the file holds them.
    private func fileSpan(_ blocks: StoredBlocks) -> [UInt8] {
        var bytes = [UInt8](repeating: 0, count: blocks.byteCount)
        let got = bytes.withUnsafeMutableBytes { pread(blocks.descriptor, $0.baseAddress, blocks.byteCount, off_t(blocks.fileOffset)) }
        XCTAssertEqual(got, blocks.byteCount)
        return bytes
    }

    /// Writes object `id`'s file back and drops it from the page cache, so that a read must go
    /// to the disk: `POSIX_FADV_DONTNEED` passes over pages still under writeback, so it is
    /// repeated until `mincore` shows no page resident (at most a second).
    private func evictFromPageCache(_ id: SliceID, in storeDirectory: String? = nil) {
        let path = storeDirectory.map { "\($0)/\(String(format: "%02llx", id & 0xFF))/\(String(format: "%016llx", id))" }
            ?? objectPath(id)
        let fd = open(path, O_RDONLY)
        XCTAssertGreaterThanOrEqual(fd, 0)
        defer { close(fd) }
        XCTAssertEqual(fdatasync(fd), 0)
        var info = stat()
        XCTAssertEqual(fstat(fd, &info), 0)
        let length = Int(info.st_size)
        guard length > 0, let mapped = mmap(nil, length, PROT_READ, MAP_SHARED, fd, 0), mapped != MAP_FAILED else {
            return XCTFail("cannot map \(path)")
        }
        defer { munmap(mapped, length) }
        var resident = [UInt8](repeating: 0, count: (length + 4095) / 4096)
        for _ in 0..<100 {
            XCTAssertEqual(posix_fadvise(fd, 0, 0, POSIX_FADV_DONTNEED), 0)
            XCTAssertEqual(mincore(mapped, length, &resident), 0)
            if resident.allSatisfy({ $0 & 1 == 0 }) { return }
            usleep(10_000)
        }
    }

    /// Skips a test where the test directory's file system refuses O_DIRECT or keeps a file in
    /// the page cache after `POSIX_FADV_DONTNEED` (the cache then never reads direct): a span
    /// read from a store of its own, out of the page cache, tells.
    private func requireDirectIO() throws {
        let probeDirectory = directory + "-probe"
        defer { try? FileManager.default.removeItem(atPath: probeDirectory) }
        let probe = try ChunkStore(directory: probeDirectory, compression: .none, logger: log.logger,
                                   spanCacheBytes: 8 << 20)
        try probe.write(id: 1, data: [UInt8](repeating: 7, count: b))
        evictFromPageCache(1, in: probeDirectory)
        let blocks = try probe.storedBlocks(id: 1, firstBlock: 0, count: 1)
        try XCTSkipUnless(probe.directIOCounters.enabled, "the test directory's file system refuses O_DIRECT")
        XCTAssertNotNil(blocks.memory, "a store whose file system takes O_DIRECT caches a whole-block span")
        try XCTSkipIf(probe.directIOCounters.reads == 0,
                      "the test directory's file system kept the file in the page cache after POSIX_FADV_DONTNEED")
        log.reset()
    }

    func testASpanComesFromMemoryWithTheFilesBytesAndAZeroTrailerAndIsReadOnce() throws {
        for compression in Compression.allCases {
            try? FileManager.default.removeItem(atPath: directory)
            var random = SeededRandom(seed: 91)
            let store = try makeStore(compression, spanCacheBytes: 64 << 20)
            let data = random.bytes(8 * b)   // random: stored raw even with zstd
            try store.write(id: 0x51, data: data)
            try requireDirectIO()
            // Written through the page cache (from unaligned memory), so read from it.
            let readsBefore = store.directIOCounters.reads
            let cached = try store.storedBlocks(id: 0x51, firstBlock: 0, count: 1024)
            XCTAssertEqual(Array(try XCTUnwrap(cached.memory)[0..<cached.byteCount]), fileSpan(cached))
            XCTAssertEqual(store.directIOCounters.reads, readsBefore, "\(compression): the page cache held it all")
            store.dropSpanCache()
            evictFromPageCache(0x51)

            let first = try store.storedBlocks(id: 0x51, firstBlock: 0, count: 1024)
            let memory = try XCTUnwrap(first.memory, "\(compression): an aligned span of whole blocks is cached")
            XCTAssertEqual(memory.count, first.byteCount + 4)
            XCTAssertEqual(Array(memory[0..<first.byteCount]), fileSpan(first), "\(compression)")
            XCTAssertEqual(Array(memory[first.byteCount...]), [0, 0, 0, 0], "the trailer says: no error")
            XCTAssertEqual(Int(bitPattern: memory.baseAddress) % 4096, 0, "page-aligned for O_DIRECT")
            XCTAssertEqual(store.directIOCounters.reads, readsBefore + 1, "read around the page cache")

            let second = try store.storedBlocks(id: 0x51, firstBlock: 0, count: 1024)
            XCTAssertEqual(second.memory?.baseAddress, memory.baseAddress, "the same span, from memory")
            XCTAssertEqual(store.directIOCounters.reads, readsBefore + 1, "no second read")
            let counters = try XCTUnwrap(store.spanCacheCounters)
            XCTAssertEqual(counters.misses, 2)
            XCTAssertEqual(counters.hits, 1)
            XCTAssertEqual(counters.spans, 1)
            // The span's cover with its trailer, in the transfer allocator's 256 KiB classes.
            XCTAssertEqual(counters.heldBytes, (8 * b + 4 + (256 << 10) - 1) / (256 << 10) * (256 << 10), "\(compression)")

            // Another window of the same object is another span.
            let middle = try store.storedBlocks(id: 0x51, firstBlock: 2, count: 3)
            let middleMemory = try XCTUnwrap(middle.memory)
            XCTAssertEqual(Array(middleMemory[0..<middle.byteCount]), Array(data[(2 * b)..<(5 * b)]))
            XCTAssertEqual(store.spanCacheCounters?.misses, 3)
        }
    }

    func testSpansThatDoNotQualifyGoFromTheFile() throws {
        try requireDirectIO()
        var random = SeededRandom(seed: 92)
        let store = try makeStore(.zstd, spanCacheBytes: 64 << 20)
        // Block 0 compresses (zeros), so block 1 starts at an unaligned file offset.
        let data = [UInt8](repeating: 0, count: b) + random.bytes(b)
        try store.write(id: 0x52, data: data)
        let unaligned = try store.storedBlocks(id: 0x52, firstBlock: 1, count: 1)
        XCTAssertNotEqual(unaligned.fileOffset % 4096, 0)
        XCTAssertNil(unaligned.memory, "not page-aligned in the file")
        XCTAssertEqual(store.spanCacheCounters?.misses, 0)

        // Raw blocks: block 1 starts page-aligned (header page + 64 KiB) and holds 1,234 bytes.
        let rawDirectory = directory + "-raw"
        defer { try? FileManager.default.removeItem(atPath: rawDirectory) }
        let raw = try ChunkStore(directory: rawDirectory, compression: .none, logger: log.logger, spanCacheBytes: 64 << 20)
        try raw.write(id: 0x57, data: random.bytes(b + 1234))
        let short = try raw.storedBlocks(id: 0x57, firstBlock: 1, count: 1)
        XCTAssertEqual(short.fileOffset % 4096, 0)
        XCTAssertNil(short.memory, "less than a block")
        // The whole object read from the disk: the O_DIRECT read of its cover ends short at the
        // file's end, unaligned, and stops there (another O_DIRECT read from there is refused
        // by some file systems, which turned O_DIRECT off for the whole store).
        evictFromPageCache(0x57, in: rawDirectory)
        let readsBefore = raw.directIOCounters.reads
        let whole = try raw.storedBlocks(id: 0x57, firstBlock: 0, count: 2)
        XCTAssertEqual(whole.byteCount, b + 1234)
        XCTAssertEqual(Array(try XCTUnwrap(whole.memory, "the same object's whole span qualifies")[0..<whole.byteCount]),
                       fileSpan(whole))
        XCTAssertEqual(raw.directIOCounters.reads, readsBefore + 1)
        XCTAssertTrue(raw.directIOCounters.enabled, "O_DIRECT still on")

        // A span above an eighth of the bound is sent from the file, and evicts nothing.
        let smallDirectory = directory + "-small"
        defer { try? FileManager.default.removeItem(atPath: smallDirectory) }
        let small = try ChunkStore(directory: smallDirectory, compression: .none, logger: log.logger,
                                   spanCacheBytes: 4 << 20)
        try small.write(id: 0x58, data: random.bytes(4 * b))
        try small.write(id: 0x59, data: random.bytes(16 * b))
        XCTAssertNotNil(try small.storedBlocks(id: 0x58, firstBlock: 0, count: 4).memory, "512 KiB of 4 MiB")
        XCTAssertNil(try small.storedBlocks(id: 0x59, firstBlock: 0, count: 16).memory, "1.25 MiB of 4 MiB")
        XCTAssertEqual(small.spanCacheCounters?.spans, 1)
        XCTAssertEqual(small.spanCacheCounters?.misses, 1)

        let noCache = try ChunkStore(directory: directory + "-plain", compression: .none, logger: log.logger)
        defer { try? FileManager.default.removeItem(atPath: directory + "-plain") }
        try noCache.write(id: 0x53, data: random.bytes(4 * b))
        XCTAssertNil(try noCache.storedBlocks(id: 0x53, firstBlock: 0, count: 4).memory, "a store without a cache")
        XCTAssertNil(noCache.spanCacheCounters)
    }

    func testConcurrentReadersOfOneSpanShareOneRead() throws {
        var random = SeededRandom(seed: 93)
        let store = try makeStore(spanCacheBytes: 64 << 20)
        let data = random.bytes(64 * b)
        try store.write(id: 0x54, data: data)
        try requireDirectIO()
        let readers = 8
        let results = LockedArray<UnsafeRawPointer?>()
        DispatchQueue.concurrentPerform(iterations: readers) { _ in
            let blocks = try? store.storedBlocks(id: 0x54, firstBlock: 0, count: 64)
            results.append(blocks?.memory?.baseAddress)
        }
        let bases = results.values
        XCTAssertEqual(bases.count, readers)
        XCTAssertEqual(Set(bases.map { $0.map { Int(bitPattern: $0) } ?? 0 }).count, 1, "every reader got the one span")
        let counters = try XCTUnwrap(store.spanCacheCounters)
        XCTAssertEqual(counters.misses, 1, "one read")
        XCTAssertEqual(counters.hits + counters.sharedWaits, UInt64(readers - 1))
        let again = try store.storedBlocks(id: 0x54, firstBlock: 0, count: 64)
        XCTAssertEqual(Array(try XCTUnwrap(again.memory)[0..<again.byteCount]), data)
    }

    func testTheCacheStaysWithinItsBoundReusesItsMemoryAndKeepsASpanBeingSent() throws {
        var random = SeededRandom(seed: 94)
        let bound = 4 << 20
        let store = try makeStore(spanCacheBytes: bound)
        var objects: [SliceID: [UInt8]] = [:]
        for index in 0..<24 {
            let id = SliceID(0x100 + index)
            objects[id] = random.bytes(4 * b)   // 256 KiB spans: 512 KiB of cache each (trailer, 256 KiB classes)
            try store.write(id: id, data: objects[id]!)
        }
        try requireDirectIO()
        // A send in flight holds the first span while the cache turns over.
        let held = try store.storedBlocks(id: 0x100, firstBlock: 0, count: 4)
        for index in 1..<24 {
            let id = SliceID(0x100 + index)
            let blocks = try store.storedBlocks(id: id, firstBlock: 0, count: 4)
            XCTAssertEqual(Array(try XCTUnwrap(blocks.memory)[0..<blocks.byteCount]), objects[id]!, "object \(index)")
            let counters = try XCTUnwrap(store.spanCacheCounters)
            XCTAssertLessThanOrEqual(counters.heldBytes + counters.freeBytes, bound, "after object \(index)")
        }
        let counters = try XCTUnwrap(store.spanCacheCounters)
        XCTAssertEqual(counters.misses, 24)
        XCTAssertLessThan(counters.spans, 24, "the least recently used went")
        XCTAssertGreaterThan(counters.reusedBlocks, 0, "evicted spans' memory served later misses")
        XCTAssertLessThanOrEqual(Int(counters.freshBlocks), bound / (512 << 10) + 2,
                                 "fresh memory only until the cache filled")
        XCTAssertEqual(Array(try XCTUnwrap(held.memory)[0..<held.byteCount]), objects[0x100]!,
                       "an evicted span being sent keeps its bytes")
        // An evicted span is read again.
        evictFromPageCache(0x100)
        let readsBefore = store.directIOCounters.reads
        _ = try store.storedBlocks(id: 0x100, firstBlock: 0, count: 4)
        XCTAssertEqual(store.directIOCounters.reads, readsBefore + 1)

        store.dropSpanCache()
        XCTAssertEqual(store.spanCacheCounters?.spans, 0)
        XCTAssertEqual(store.spanCacheCounters?.heldBytes, 0)
        XCTAssertEqual(Array(try XCTUnwrap(held.memory)[0..<held.byteCount]), objects[0x100]!,
                       "dropping the cache keeps a span being sent")
    }

    func testASpanWhoseReadFailsIsNotCachedAndGoesFromTheFile() throws {
        var random = SeededRandom(seed: 95)
        let store = try makeStore(spanCacheBytes: 64 << 20)
        try store.write(id: 0x55, data: random.bytes(8 * b))
        try requireDirectIO()
        _ = try store.length(id: 0x55)   // opened, header checked
        // The file ends early (damage after the header was read).
        XCTAssertEqual(truncate(objectPath(0x55), off_t(4096 + 3 * b)), 0)
        let blocks = try store.storedBlocks(id: 0x55, firstBlock: 2, count: 4)
        XCTAssertNil(blocks.memory, "served from the file, which reports the short read")
        let counters = try XCTUnwrap(store.spanCacheCounters)
        XCTAssertEqual(counters.failedReads, 1)
        XCTAssertEqual(counters.spans, 0)
    }

    /// An object file replaced (same id, another layout) after its open descriptor was cached:
    /// the O_DIRECT descriptor, opened by path, names the new file and is not used; reads keep
    /// the open file's bytes. Before 2026-12-07 an aligned read mixed the old layout with the new
    /// file and got EIO.
    func testAReplacedObjectFileIsNotReadWithTheOldLayout() throws {
        let store = try makeStore(.none)
        // Zeros and random halves: compressed by a zstd store, raw here.
        var random = SeededRandom(seed: 96)
        var data: [UInt8] = []
        for _ in 0..<4 { data += [UInt8](repeating: 0, count: b) + random.bytes(b) }
        try store.write(id: 0x56, data: data)
        XCTAssertEqual(try store.read(id: 0x56, offset: 10, length: 10), Array(data[10..<20]), "opened and cached")

        let other = directory + "-zstd"
        defer { try? FileManager.default.removeItem(atPath: other) }
        let zstd = try ChunkStore(directory: other, compression: .zstd, logger: log.logger)
        try zstd.write(id: 0x56, data: data)
        let replacement = objectPath(0x56) + ".new"
        XCTAssertEqual(link("\(other)/56/\(String(format: "%016llx", 0x56))", replacement), 0)
        XCTAssertEqual(rename(replacement, objectPath(0x56)), 0)

        let destination = UnsafeMutableRawBufferPointer.allocate(byteCount: data.count, alignment: 4096)
        defer { destination.deallocate() }
        try store.read(id: 0x56, offset: 0, into: destination)
        XCTAssertEqual(Array(destination), data)
        XCTAssertTrue(log.errors.isEmpty, "\(log.errors)")
    }
}

/// An array appended to from many threads.
final class LockedArray<Element>: @unchecked Sendable {
    private let lock = NSLock()
    private var items: [Element] = []

    func append(_ item: Element) {
        lock.lock(); defer { lock.unlock() }
        items.append(item)
    }

    var values: [Element] {
        lock.lock(); defer { lock.unlock() }
        return items
    }
}
