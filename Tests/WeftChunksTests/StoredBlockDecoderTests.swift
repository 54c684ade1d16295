#if canImport(Glibc)
import Glibc
#endif
import Foundation
import WeftChunks
import WeftProto
import WeftTestSupport
import XCTest

/// `ChunkStore.storedBlocks` and `StoredBlockDecoder` (SPEC.md §4, Stored-block reads): the span a
/// hub sends unread, decoded by the reader into exactly the bytes `ChunkStore.read` gives, or an error.
final class StoredBlockDecoderTests: ChunkTestCase {
    let b = Limits.blockSizeBytes

    /// The stored bytes of `blocks`, read from their span as a server would send them.
    private func spanBytes(_ blocks: StoredBlocks) -> [UInt8] {
        var bytes = [UInt8](repeating: 0, count: blocks.byteCount)
        let got = bytes.withUnsafeMutableBytes { pread(blocks.descriptor, $0.baseAddress, blocks.byteCount, off_t(blocks.fileOffset)) }
        XCTAssertEqual(got, blocks.byteCount)
        return bytes
    }

    /// Decodes with the stored bytes in place at the start of the destination (as the agent's
    /// reading thread leaves them when they fit), else from a buffer of their own.
    private func decode(_ blocks: StoredBlocks, _ stored: [UInt8], readBytes: Int) throws -> [UInt8] {
        var destination = [UInt8](repeating: 0xEE, count: readBytes)
        try destination.withUnsafeMutableBytes { target in
            if stored.count <= readBytes {
                stored.withUnsafeBytes { target.baseAddress!.copyMemory(from: $0.baseAddress!, byteCount: stored.count) }
                try StoredBlockDecoder.decode(id: blocks.id, firstBlock: blocks.firstBlock, rawLength: blocks.rawLength,
                                              entries: blocks.entries,
                                              stored: UnsafeRawBufferPointer(start: target.baseAddress, count: stored.count),
                                              into: target, logger: log.logger)
            } else {
                try stored.withUnsafeBytes {
                    try StoredBlockDecoder.decode(id: blocks.id, firstBlock: blocks.firstBlock, rawLength: blocks.rawLength,
                                                  entries: blocks.entries, stored: $0, into: target, logger: log.logger)
                }
            }
        }
        return destination
    }

    func testStoredBlocksDecodeToTheBytesTheStoreReads() throws {
        for compression in Compression.allCases {
            try? FileManager.default.removeItem(atPath: directory)
            var random = SeededRandom(seed: 77)
            // Compressible and random blocks alternate; the last block is partial.
            let data = TestData.mixed(5 * b + 1234, &random)
            let store = try makeStore(compression)
            let id: SliceID = 0x5107
            try store.write(id: id, data: data)
            let whole = try store.storedBlocks(id: id, firstBlock: 0, count: 1024)
            XCTAssertEqual(whole.entries.count, 6, "\(compression): fewer blocks at the object's end")
            XCTAssertEqual(whole.rawLength, data.count)
            XCTAssertEqual(whole.entries.contains { $0.compressed }, compression == .zstd, "\(compression)")
            XCTAssertEqual(try decode(whole, spanBytes(whole), readBytes: data.count), data, "\(compression) whole object")

            // Two blocks from block 2; the last block alone; a read ending inside a block (its
            // whole block is sent and checked, the caller gets its part).
            let two = try store.storedBlocks(id: id, firstBlock: 2, count: 2)
            XCTAssertEqual(try decode(two, spanBytes(two), readBytes: 2 * b), Array(data[(2 * b)..<(4 * b)]))
            let last = try store.storedBlocks(id: id, firstBlock: 5, count: 1)
            XCTAssertEqual(try decode(last, spanBytes(last), readBytes: 1234), Array(data[(5 * b)...]))
            let part = try store.storedBlocks(id: id, firstBlock: 1, count: 2)
            XCTAssertEqual(try decode(part, spanBytes(part), readBytes: b + 100), Array(data[b..<(2 * b + 100)]),
                           "\(compression) a read that ends inside a block")
        }
    }

    func testADamagedBlockIsEIOWithOneLogLineAndTheOthersStillDecode() throws {
        for compression in Compression.allCases {
            try? FileManager.default.removeItem(atPath: directory)
            var random = SeededRandom(seed: 78)
            let data = TestData.mixed(4 * b, &random)
            let store = try makeStore(compression)
            let id: SliceID = 0xDA3A
            try store.write(id: id, data: data)
            let blocks = try store.storedBlocks(id: id, firstBlock: 0, count: 4)
            for damaged in 0..<4 {
                var stored = spanBytes(blocks)
                let start = blocks.entries[..<damaged].reduce(0) { $0 + Int($1.storedLength) }
                stored[start + Int(blocks.entries[damaged].storedLength) / 2] ^= 0x10
                log.reset()
                assertErrno(EIO, try decode(blocks, stored, readBytes: data.count), "\(compression) block \(damaged)")
                XCTAssertEqual(log.errors.count, 1, "\(log.errors)")
                XCTAssertTrue(log.errors.first?.contains("000000000000da3a") == true, "\(log.errors)")
                XCTAssertTrue(log.errors.first?.contains("block \(damaged)") == true, "\(log.errors)")
                // The blocks before and after it still decode on their own.
                for other in 0..<4 where other != damaged {
                    let single = try store.storedBlocks(id: id, firstBlock: other, count: 1)
                    XCTAssertEqual(try decode(single, spanBytes(single), readBytes: b),
                                   Array(data[(other * b)..<((other + 1) * b)]))
                }
            }
            // A span of zeros (what a hub sends after a failed read) never decodes as data.
            let zeros = [UInt8](repeating: 0, count: blocks.byteCount)
            assertErrno(EIO, try decode(blocks, zeros, readBytes: data.count), "\(compression) zeros")
        }
    }

    func testEntriesThatBreakTheFormatAreMalformedAndReadsPastTheEndAreEINVAL() throws {
        var random = SeededRandom(seed: 79)
        let data = TestData.mixed(3 * b, &random)
        let store = try makeStore(.zstd)
        let id: SliceID = 0xBAD
        try store.write(id: id, data: data)
        let blocks = try store.storedBlocks(id: id, firstBlock: 0, count: 3)
        XCTAssertTrue(blocks.entries[0].compressed && !blocks.entries[1].compressed, "mixed data: zstd, then raw")
        let stored = spanBytes(blocks)
        let storedCount = stored.count
        func check(_ entries: [StoredBlockEntry], storedBytes: Int? = nil, rawLength: Int = 3 * 65536) throws {
            _ = try StoredBlockDecoder.check(id: id, firstBlock: 0, rawLength: rawLength, entries: entries,
                                             storedBytes: storedBytes ?? storedCount, readBytes: 3 * 65536)
        }
        XCTAssertNoThrow(try check(blocks.entries))
        var entries = blocks.entries
        entries[1].storedLength -= 1   // a raw block shorter than its raw length
        assertErrno(EPROTO, try check(entries, storedBytes: stored.count - 1))
        entries = blocks.entries
        entries[0].storedLength = UInt32(b)   // a compressed block as long as its raw bytes
        assertErrno(EPROTO, try check(entries))
        entries = blocks.entries
        entries[2].flags = 2   // an unknown flag
        assertErrno(EPROTO, try check(entries))
        assertErrno(EPROTO, try check(blocks.entries, storedBytes: stored.count + 1), "stored bytes not the sum")
        assertErrno(EPROTO, try check(Array(blocks.entries.prefix(2))), "fewer blocks than the read needs")
        assertErrno(EINVAL, try check(blocks.entries, rawLength: 2 * b + 10), "a read past the object's end")

        // The store refuses what no object holds.
        assertErrno(EINVAL, try store.storedBlocks(id: id, firstBlock: 3, count: 1))
        assertErrno(EINVAL, try store.storedBlocks(id: id, firstBlock: 0, count: 0))
        assertErrno(EINVAL, try store.storedBlocks(id: id, firstBlock: 0, count: StoredBlocks.countMax + 1))
        assertErrno(ENOENT, try store.storedBlocks(id: 0xFFFF, firstBlock: 0, count: 1))
    }
}
