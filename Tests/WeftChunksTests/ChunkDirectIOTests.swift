import Foundation
import WeftChunks
import WeftProto
import WeftTestSupport
import XCTest

/// Format version 2 (page-aligned payloads) and the O_DIRECT paths it allows.
final class ChunkDirectIOTests: ChunkTestCase {
    static let block = Limits.blockSizeBytes

    /// Page-aligned memory holding `bytes`, freed after `body`.
    func withAligned<T>(_ bytes: [UInt8], _ body: (UnsafeMutableRawBufferPointer) throws -> T) rethrows -> T {
        let buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: max(bytes.count, 1), alignment: 4096)
        defer { buffer.deallocate() }
        bytes.withUnsafeBytes { buffer.copyMemory(from: $0) }
        return try body(UnsafeMutableRawBufferPointer(rebasing: buffer[0..<bytes.count]))
    }

    /// Whether the directory's file system took O_DIRECT (ext4 on these machines). Where it
    /// refused, the store must have fallen back to the page cache for good, having moved nothing
    /// directly: the callers then check the bytes only.
    func directIOTaken(_ store: ChunkStore) -> Bool {
        let counters = store.directIOCounters
        if !counters.enabled {
            XCTAssertEqual(counters.reads + counters.writes, 0, "a refused O_DIRECT moved bytes")
        }
        return counters.enabled
    }

    func testAlignedObjectGoesToDiskAndBackWithoutThePageCache() throws {
        var random = SeededRandom(seed: 41)
        let data = TestData.random(3 * Self.block + 1000, &random)
        let store = try makeStore()
        try withAligned(data) { try store.write(id: 1, data: UnsafeRawBufferPointer($0)) }
        let direct = directIOTaken(store)
        if direct { XCTAssertEqual(store.directIOCounters.writes, 1) }
        XCTAssertEqual(ParsedObject(try fileBytes(1)).dataOffset, 4096)

        // Whole object into page-aligned memory: direct; unaligned destinations: buffered.
        let readBack = try withAligned([UInt8](repeating: 0, count: data.count)) { destination in
            try store.read(id: 1, offset: 0, into: destination)
            return Array(destination)
        }
        XCTAssertEqual(readBack, data)
        if direct { XCTAssertGreaterThanOrEqual(store.directIOCounters.reads, 1) }
        XCTAssertEqual(try store.read(id: 1, offset: 0, length: data.count), data)
        for (offset, length) in [(1, 10), (Self.block - 1, 2), (Self.block, Self.block), (3 * Self.block, 1000), (5, data.count - 5)] {
            XCTAssertEqual(try store.read(id: 1, offset: offset, length: length), Array(data[offset..<offset + length]),
                           "\(offset)+\(length)")
        }
        // And a fresh store (cold open-object cache) reads it the same way.
        let reopened = try makeStore()
        let again = try withAligned([UInt8](repeating: 0, count: 2 * Self.block)) { destination in
            try reopened.read(id: 1, offset: Self.block, into: destination)
            return Array(destination)
        }
        XCTAssertEqual(again, Array(data[Self.block..<3 * Self.block]))
        XCTAssertEqual(log.errors, [])
    }

    func testStoreThatKeepsReadsInThePageCacheStillWritesDirect() throws {
        var random = SeededRandom(seed: 43)
        let data = TestData.random(4 * Self.block, &random)
        let store = try makeStore(directReads: false)
        try withAligned(data) { try store.write(id: 3, data: UnsafeRawBufferPointer($0)) }
        let direct = directIOTaken(store)
        if direct { XCTAssertEqual(store.directIOCounters.writes, 1) }
        let readBack = try withAligned([UInt8](repeating: 0, count: data.count)) { destination in
            try store.read(id: 3, offset: 0, into: destination)
            return Array(destination)
        }
        XCTAssertEqual(readBack, data)
        XCTAssertEqual(store.directIOCounters.reads, 0, "an aligned read went around the page cache")
        XCTAssertEqual(log.errors, [])
    }

    /// The file is the same bytes whichever path wrote it.
    func testDirectAndBufferedWritesProduceIdenticalFiles() throws {
        var random = SeededRandom(seed: 42)
        let data = TestData.random(2 * Self.block + 4097, &random)
        let direct = try makeStore()
        try withAligned(data) { try direct.write(id: 7, data: UnsafeRawBufferPointer($0)) }
        let directBytes = try fileBytes(7)
        try direct.delete(id: 7)

        let buffered = try makeStore(directIO: false)
        try withAligned(data) { try buffered.write(id: 7, data: UnsafeRawBufferPointer($0)) }
        XCTAssertEqual(buffered.directIOCounters, DirectIOCounters(enabled: false, reads: 0, writes: 0))
        XCTAssertEqual(try fileBytes(7), directBytes)
        XCTAssertEqual(try buffered.read(id: 7, offset: 0, length: data.count), data)
    }

    /// An object with compressed blocks is assembled whole in page-aligned memory and its
    /// page-multiple part written with O_DIRECT, from any source memory: the file is the same
    /// bytes a buffered store writes, its raw blocks (ones that did not shrink) included, and it
    /// reads back whole and in pieces.
    func testCompressedObjectIsWrittenDirectAndMatchesABufferedWrite() throws {
        var random = SeededRandom(seed: 44)
        // Blocks 0 and 2 compress, 1 and 3 do not; the last block is short. Unaligned source.
        var data = [UInt8](repeating: 7, count: Self.block)
        data += TestData.random(Self.block, &random)
        data += (0..<Self.block).map { UInt8(truncatingIfNeeded: $0 / 512) }
        data += TestData.random(Self.block / 2 + 3, &random)
        let buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: data.count + 1, alignment: 4096)
        defer { buffer.deallocate() }
        data.withUnsafeBytes { (buffer.baseAddress! + 1).copyMemory(from: $0.baseAddress!, byteCount: data.count) }
        let source = UnsafeRawBufferPointer(start: buffer.baseAddress! + 1, count: data.count)

        let direct = try makeStore(.zstd)
        try direct.write(id: 8, data: source)
        let directBytes = try fileBytes(8)
        let parsed = ParsedObject(directBytes)
        XCTAssertEqual(parsed.dataOffset, parsed.headerLength)
        XCTAssertEqual(parsed.blocks.map(\.flags), [1, 0, 1, 0], "which blocks were stored compressed")
        if directIOTaken(direct) { XCTAssertEqual(direct.directIOCounters.writes, 1) }
        XCTAssertEqual(try direct.read(id: 8, offset: 0, length: data.count), data)
        for (offset, length) in [(1, 10), (Self.block - 1, 2), (Self.block + 5, 2 * Self.block), (3 * Self.block, Self.block / 2 + 3)] {
            XCTAssertEqual(try direct.read(id: 8, offset: offset, length: length), Array(data[offset..<offset + length]),
                           "\(offset)+\(length)")
        }
        try direct.delete(id: 8)

        let buffered = try makeStore(.zstd, directIO: false)
        try buffered.write(id: 8, data: source)
        XCTAssertEqual(try fileBytes(8), directBytes)
        XCTAssertEqual(try makeStore().read(id: 8, offset: 0, length: data.count), data)
        XCTAssertEqual(log.errors, [])
    }

    /// A zstd store writes an object none of whose blocks shrink as an uncompressed one: padded
    /// to a page and, from aligned memory, directly.
    func testIncompressibleObjectInAZstdStoreIsStoredRawAndAligned() throws {
        var random = SeededRandom(seed: 45)
        let data = TestData.random(2 * Self.block + 100, &random)
        let store = try makeStore(.zstd)
        try withAligned(data) { try store.write(id: 9, data: UnsafeRawBufferPointer($0)) }
        let parsed = ParsedObject(try fileBytes(9))
        XCTAssertEqual(parsed.dataOffset, 4096)
        XCTAssertEqual(parsed.blocks.map(\.flags), [0, 0, 0])
        if directIOTaken(store) { XCTAssertEqual(store.directIOCounters.writes, 1) }
        XCTAssertEqual(try store.read(id: 9, offset: 0, length: data.count), data)
    }

    /// Objects of at most 64 KiB, which a strict commit may carry in the metadata journal and
    /// so reads back at once, are written through the page cache even from aligned memory,
    /// compressed or not; one byte more goes direct.
    func testObjectsTheJournalMayCarryStayInThePageCache() throws {
        var random = SeededRandom(seed: 46)
        for compression in [Compression.none, .zstd] {
            let store = try makeStore(compression)
            let limit = Limits.journaledObjectMaxBytes
            // Half compressible, half random: with zstd the object keeps a compressed block.
            let small = [UInt8](repeating: 3, count: limit / 2) + TestData.random(limit / 2, &random)
            try withAligned(small) { try store.write(id: 20, data: UnsafeRawBufferPointer($0)) }
            XCTAssertEqual(store.directIOCounters.writes, 0, "\(compression)")
            XCTAssertEqual(try store.read(id: 20, offset: 0, length: small.count), small)
            let larger = small + TestData.random(1, &random) + [UInt8](repeating: 5, count: limit)
            try withAligned(larger) { try store.write(id: 21, data: UnsafeRawBufferPointer($0)) }
            if directIOTaken(store) { XCTAssertEqual(store.directIOCounters.writes, 1, "\(compression)") }
            XCTAssertEqual(try store.read(id: 21, offset: 0, length: larger.count), larger)
            try store.delete(id: 20)
            try store.delete(id: 21)
        }
    }

    /// Memory that is not page-aligned is written through the page cache, and reads the same.
    func testUnalignedSourceIsWrittenBuffered() throws {
        var random = SeededRandom(seed: 43)
        let data = TestData.random(Self.block + 1, &random)
        let store = try makeStore()
        let buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: data.count + 1, alignment: 4096)
        defer { buffer.deallocate() }
        data.withUnsafeBytes { (buffer.baseAddress! + 1).copyMemory(from: $0.baseAddress!, byteCount: data.count) }
        try store.write(id: 3, data: UnsafeRawBufferPointer(start: buffer.baseAddress! + 1, count: data.count))
        XCTAssertEqual(store.directIOCounters.writes, 0)
        XCTAssertEqual(ParsedObject(try fileBytes(3)).dataOffset, 4096)
        XCTAssertEqual(try store.read(id: 3, offset: 0, length: data.count), data)
    }

    /// Small objects and objects with compressed blocks keep their payloads right after the
    /// header (no page of padding); one whose file is shorter than a page is not written directly.
    func testSmallAndCompressedObjectsAreNotPadded() throws {
        let store = try makeStore(.zstd)
        let compressible = [UInt8](repeating: 9, count: 2 * Self.block)
        try withAligned(compressible) { try store.write(id: 4, data: UnsafeRawBufferPointer($0)) }
        let parsed = ParsedObject(try fileBytes(4))
        XCTAssertEqual(parsed.dataOffset, parsed.headerLength)
        XCTAssertLessThan(try fileBytes(4).count, 4096)
        XCTAssertEqual(store.directIOCounters.writes, 0)
        XCTAssertEqual(try store.read(id: 4, offset: 0, length: compressible.count), compressible)

        let plain = try makeStore()
        try withAligned([UInt8](repeating: 1, count: Self.block - 1)) { try plain.write(id: 5, data: UnsafeRawBufferPointer($0)) }
        let small = ParsedObject(try fileBytes(5))
        XCTAssertEqual(small.dataOffset, small.headerLength)
        XCTAssertEqual(try fileBytes(5).count, small.headerLength + Self.block - 1)
    }

    /// Objects written by format version 1 (payloads right after the header, field 28 zero)
    /// stay readable.
    func testVersionOneObjectsStillRead() throws {
        var random = SeededRandom(seed: 44)
        let data = TestData.random(Self.block - 100, &random)
        let store = try makeStore()
        try store.write(id: 6, data: data)
        var bytes = try fileBytes(6)
        let parsed = ParsedObject(bytes)
        XCTAssertEqual(parsed.dataOffset, parsed.headerLength, "a small object is laid out as version 1 would")
        bytes[4] = 1
        for i in 28..<32 { bytes[i] = 0 }
        let checksumAt = parsed.headerLength - 4
        let crc = crc32c(Array(bytes[0..<checksumAt]))
        for i in 0..<4 { bytes[checksumAt + i] = UInt8(truncatingIfNeeded: crc >> (8 * UInt32(i))) }
        try setFileBytes(6, bytes)
        let reopened = try makeStore()
        XCTAssertEqual(try reopened.read(id: 6, offset: 0, length: data.count), data)
        XCTAssertEqual(try reopened.verify(id: 6), data.count)
    }

    /// A flipped byte in an aligned object is found on the direct path too: EIO, one log line.
    func testDamageIsFoundOnTheDirectPath() throws {
        var random = SeededRandom(seed: 45)
        let data = TestData.random(4 * Self.block, &random)
        let store = try makeStore()
        try withAligned(data) { try store.write(id: 8, data: UnsafeRawBufferPointer($0)) }
        let direct = directIOTaken(store)
        let block2 = ParsedObject(try fileBytes(8)).blocks[2]
        try corrupt(8, at: block2.fileOffset + 17)
        let reopened = try makeStore()
        try withAligned([UInt8](repeating: 0, count: data.count)) { destination in
            assertErrno(EIO, try reopened.read(id: 8, offset: 0, into: destination))
        }
        if direct { XCTAssertGreaterThanOrEqual(reopened.directIOCounters.reads, 1) }
        XCTAssertEqual(log.errors.count, 1, "\(log.errors)")
        XCTAssertTrue(log.errors.first?.contains("block 2") ?? false, "\(log.errors)")
        // The undamaged blocks still read, directly.
        let intact = try withAligned([UInt8](repeating: 0, count: 2 * Self.block)) { destination in
            try reopened.read(id: 8, offset: 0, into: destination)
            return Array(destination)
        }
        XCTAssertEqual(intact, Array(data[0..<2 * Self.block]))
    }
}
