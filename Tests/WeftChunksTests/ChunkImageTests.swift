#if canImport(Glibc)
import Glibc
#endif
import Foundation
@testable import WeftChunks
import WeftProto
import WeftTestSupport
import XCTest

/// Images of compressed objects built outside the store (an agent's compressed upload, SPEC.md
/// §4 Compressed uploads): `ChunkImage.withCompressed` builds the bytes a store would write,
/// and `ChunkStore.writeImage` stores an image only after checking it as a read would.
final class ChunkImageTests: ChunkTestCase {
    static let block = Limits.blockSizeBytes

    /// The image of `data` as object `id`, copied out of the pool; nil when nothing shrank.
    func image(id: SliceID, _ data: [UInt8]) -> [UInt8]? {
        data.withUnsafeBytes { raw in ChunkImage.withCompressed(id: id, data: raw) { $0.map { Array($0) } } }
    }

    /// `image` with its block table changed by `change` and the header checksum made right again,
    /// so that only the rule under test is broken.
    func rewritten(_ image: [UInt8], id: SliceID, version: UInt8 = ChunkFormat.version, compressionByte: UInt8? = nil,
                   _ change: (inout ContiguousArray<BlockEntry>) -> Void = { _ in }) throws -> [UInt8] {
        var copy = image
        let layout = try image.withUnsafeBytes { try ChunkFormat.decodeHeader($0, fileBytes: image.count, expectedID: id) }
        var blocks = layout.blocks
        change(&blocks)
        let headerLength = ChunkFormat.headerBytes(blockCount: blocks.count)
        copy.withUnsafeMutableBytes { bytes in
            blocks.withUnsafeBufferPointer {
                ChunkFormat.encodeHeader(into: UnsafeMutableRawBufferPointer(rebasing: bytes[0..<headerLength]), id: id,
                                         compression: .zstd, rawLength: layout.rawLength, dataOffset: layout.dataOffset,
                                         blocks: $0)
            }
            if version != ChunkFormat.version || compressionByte != nil {
                bytes[4] = version
                if let compressionByte { bytes[5] = compressionByte }
                // Version 1 has no data-offset field (its payloads follow the header).
                if version == 1 { bytes.storeBytes(of: UInt32(0), toByteOffset: 28, as: UInt32.self) }
                let checksum = crc32c(UnsafeRawBufferPointer(rebasing: bytes[0..<headerLength - 4]))
                bytes.storeBytes(of: checksum.littleEndian, toByteOffset: headerLength - 4, as: UInt32.self)
            }
        }
        return copy
    }

    func testAnImageIsTheFileTheStoreWouldWriteAndGoesDirect() throws {
        var random = SeededRandom(seed: 54)
        let data = TestData.mixed(4 * Self.block + 5000, &random)
        let store = try makeStore(.zstd)
        try data.withUnsafeBytes { raw in
            try ChunkImage.withCompressed(id: 5, data: raw) { image in
                let image = try XCTUnwrap(image, "half the blocks compress")
                XCTAssertEqual(Int(bitPattern: image.baseAddress) % 4096, 0, "pooled images are page-aligned")
                try store.writeImage(id: 5, image: image)
            }
        }
        if directIOTaken(store) { XCTAssertEqual(store.directIOCounters.writes, 1, "the image went out with O_DIRECT") }
        XCTAssertEqual(try store.read(id: 5, offset: 0, length: data.count), data)
        XCTAssertEqual(try store.read(id: 5, offset: Self.block - 3, length: 10), Array(data[Self.block - 3..<Self.block + 7]))
        let parsed = ParsedObject(try fileBytes(5))
        XCTAssertEqual(parsed.blocks.map(\.flags), [1, 0, 1, 0, 1], "compressed and raw blocks alternate")

        // The same bytes as the store's own write of the same object.
        let other = directory + "-other"
        defer { try? FileManager.default.removeItem(atPath: other) }
        let reference = try ChunkStore(directory: other, compression: .zstd, logger: log.logger)
        try reference.write(id: 5, data: data)
        let referenceBytes = [UInt8](try Data(contentsOf: URL(fileURLWithPath: other + "/05/0000000000000005")))
        XCTAssertEqual(try fileBytes(5), referenceBytes)
        XCTAssertEqual(try store.verify(id: 5), data.count)
        XCTAssertEqual(log.errors, [])
    }

    func directIOTaken(_ store: ChunkStore) -> Bool {
        let counters = store.directIOCounters
        if !counters.enabled { XCTAssertEqual(counters.writes, 0, "a refused O_DIRECT moved bytes") }
        return counters.enabled
    }

    func testNothingThatShrinksGivesNoImage() throws {
        var random = SeededRandom(seed: 55)
        XCTAssertNil(image(id: 1, TestData.random(3 * Self.block, &random)))
        XCTAssertNil(image(id: 1, []))
        XCTAssertNil(image(id: 1, [7]), "a one-byte block cannot shrink")
        XCTAssertNotNil(image(id: 1, [UInt8](repeating: 7, count: 100)))
    }

    func testImagesThatFailACheckAreRefusedAndNothingIsStored() throws {
        var random = SeededRandom(seed: 56)
        let data = TestData.mixed(3 * Self.block + 100, &random)
        let good = try XCTUnwrap(image(id: 9, data))
        let layout = try good.withUnsafeBytes { try ChunkFormat.decodeHeader($0, fileBytes: good.count, expectedID: 9) }
        let compressed = try XCTUnwrap(layout.blocks.first { $0.compressed })
        var flippedPayload = good
        flippedPayload[compressed.fileOffset + compressed.storedLength / 2] ^= 0x5A
        var flippedRaw = good
        let rawBlock = try XCTUnwrap(layout.blocks.first { !$0.compressed })
        flippedRaw[rawBlock.fileOffset + 17] ^= 1
        // A well-formed object without a compressed block (what `write` stores uncompressed).
        let randomData = TestData.random(2 * Self.block, &random)
        let headerLength = ChunkFormat.headerBytes(blockCount: 2)
        let rawEntries = ContiguousArray((0..<2).map { index in
            BlockEntry(fileOffset: headerLength + index * Self.block, storedLength: Self.block,
                       crc: crc32c(Array(randomData[index * Self.block..<(index + 1) * Self.block])), compressed: false)
        })
        var allRaw = [UInt8](repeating: 0, count: headerLength) + randomData
        allRaw.withUnsafeMutableBytes { bytes in
            rawEntries.withUnsafeBufferPointer {
                ChunkFormat.encodeHeader(into: UnsafeMutableRawBufferPointer(rebasing: bytes[0..<headerLength]), id: 9,
                                         compression: .zstd, rawLength: randomData.count, dataOffset: headerLength,
                                         blocks: $0)
            }
        }
        // The payloads moved 8 bytes on, behind zero padding: a valid object file, not an image.
        let headerBytes = ChunkFormat.headerBytes(blockCount: layout.blocks.count)
        var padded = Array(good[0..<headerBytes]) + [UInt8](repeating: 0, count: 8) + Array(good[headerBytes...])
        padded.withUnsafeMutableBytes { bytes in
            var entries = layout.blocks
            for index in entries.indices { entries[index].fileOffset += 8 }
            entries.withUnsafeBufferPointer {
                ChunkFormat.encodeHeader(into: UnsafeMutableRawBufferPointer(rebasing: bytes[0..<headerBytes]), id: 9,
                                         compression: .zstd, rawLength: layout.rawLength, dataOffset: headerBytes + 8,
                                         blocks: $0)
            }
        }
        XCTAssertNoThrow(try padded.withUnsafeBytes { try ChunkFormat.decodeHeader($0, fileBytes: padded.count, expectedID: 9) },
                         "the padded file is well formed")
        // Each case, and words of the reason the refusal must give (so that the rule under test,
        // not an earlier one, refused it).
        let cases: [(String, [UInt8], String)] = [
            ("built for another id", try XCTUnwrap(image(id: 10, data)), "header names chunk"),
            ("one byte short", Array(good.dropLast()), "truncated or extended"),
            ("one byte over", good + [0], "truncated or extended"),
            ("empty", [], "shorter than the smallest header"),
            ("a header only", Array(good.prefix(ChunkFormat.headerBytes(blockCount: layout.blocks.count))), "truncated"),
            ("a flipped byte in a compressed payload", flippedPayload, "block \(layout.blocks.firstIndex { $0.compressed }!)"),
            ("a flipped byte in a raw payload", flippedRaw, "crc32c mismatch"),
            ("a table crc that does not match", try rewritten(good, id: 9) { $0[0].crc ^= 1 }, "block 0 crc32c mismatch"),
            ("format version 1", try rewritten(good, id: 9, version: 1), "format version 1"),
            ("compression byte none", try rewritten(good, id: 9, compressionByte: 0), "compression byte 0"),
            ("padding after the header", padded, "not right after the header"),
            ("no compressed block", allRaw, "no compressed block"),
        ]
        let store = try makeStore(.zstd)
        for (name, bytes, reason) in cases {
            XCTAssertThrowsError(try bytes.withUnsafeBytes { try store.writeImage(id: 9, image: $0) }, name) { error in
                XCTAssertEqual((error as? WeftError)?.errno, EBADMSG, "\(name): \(error)")
                XCTAssertTrue("\(error)".contains(reason), "\(name): \(error) does not say \(reason)")
            }
            XCTAssertFalse(store.exists(id: 9), "\(name): nothing stored")
        }
        assertErrno(EINVAL, try good.withUnsafeBytes { try store.writeImage(id: 9, image: $0, maxRawLength: data.count - 1) },
                    "a good image of an object larger than the caller allows")
        XCTAssertEqual(store.objectCount, 0)
        // The id is still free: the good image is taken.
        try good.withUnsafeBytes { try store.writeImage(id: 9, image: $0) }
        XCTAssertEqual(try store.read(id: 9, offset: 0, length: data.count), data)
        assertErrno(EEXIST, try good.withUnsafeBytes { try store.writeImage(id: 9, image: $0) }, "objects are immutable")
    }
}
