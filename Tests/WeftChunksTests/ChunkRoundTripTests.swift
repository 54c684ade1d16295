import Foundation
import WeftChunks
import WeftProto
import WeftTestSupport
import XCTest

final class ChunkRoundTripTests: ChunkTestCase {
    static let block = Limits.blockSizeBytes
    static let fixedSizes = [0, 1, 4095, 4096, 65535, 65536, 65537, 131_072, 200_000, 4 << 20, (4 << 20) + 1]

    private func roundTrip(_ compression: Compression, _ makeData: (Int, inout SeededRandom) -> [UInt8],
                           seed: UInt64) throws {
        let store = try makeStore(compression)
        var random = SeededRandom(seed: seed)
        var sizes = Self.fixedSizes
        for _ in 0..<12 { sizes.append(Int(random.next() % UInt64(6 << 20))) }
        var expected: [SliceID: [UInt8]] = [:]
        for (index, size) in sizes.enumerated() {
            let id = SliceID(1000 + index)
            let data = makeData(size, &random)
            try store.write(id: id, data: data)
            expected[id] = data
        }
        try store.sync()
        // Read back through this store (warm cache) and a fresh one (cold headers).
        for reader in [store, try makeStore(.none)] {
            for (id, data) in expected {
                XCTAssertEqual(try reader.length(id: id), data.count, "seed \(seed) id \(id)")
                XCTAssertEqual(try reader.read(id: id, offset: 0, length: data.count), data, "seed \(seed) id \(id)")
                XCTAssertEqual(try reader.verify(id: id), data.count, "seed \(seed) id \(id)")
            }
        }
        XCTAssertTrue(log.errors.isEmpty, "\(log.errors)")
    }

    func testRoundTripUncompressedRandomData() throws {
        try roundTrip(.none, TestData.random, seed: 1)
    }

    func testRoundTripUncompressedCompressibleData() throws {
        try roundTrip(.none, TestData.compressible, seed: 2)
    }

    func testRoundTripZstdCompressibleData() throws {
        try roundTrip(.zstd, TestData.compressible, seed: 3)
    }

    func testRoundTripZstdIncompressibleData() throws {
        try roundTrip(.zstd, TestData.random, seed: 4)
    }

    func testRoundTripZstdMixedBlocks() throws {
        try roundTrip(.zstd, TestData.mixed, seed: 5)
    }

    func testLargestObjectRoundTripsAndLargerIsRejected() throws {
        let store = try makeStore(.zstd)
        var random = SeededRandom(seed: 6)
        let largest = TestData.mixed(Limits.chunkSizeMaxBytes, &random)
        try store.write(id: 1, data: largest)
        XCTAssertEqual(try store.verify(id: 1), largest.count)
        XCTAssertEqual(try store.read(id: 1, offset: 0, length: largest.count), largest)
        assertErrno(EINVAL, try store.write(id: 2, data: largest + [0]))
        XCTAssertFalse(store.exists(id: 2))
    }

    /// Reads at block boundaries, inside blocks and across several, for every kind of block.
    func testReadsAtEveryKindOfOffsetAndLength() throws {
        let b = Self.block
        for compression in Compression.allCases {
            for (kind, make) in [("mixed", TestData.mixed), ("random", TestData.random)] as [(String, (Int, inout SeededRandom) -> [UInt8])] {
                let seed: UInt64 = 77
                var random = SeededRandom(seed: seed)
                let data = make(5 * b + 123, &random)
                try? FileManager.default.removeItem(atPath: directory)
                let store = try makeStore(compression)
                try store.write(id: 42, data: data)
                let offsets = [0, 1, 4095, 4096, b - 1, b, b + 1, 2 * b - 1, 2 * b, 3 * b + 7, 5 * b, 5 * b + 122, data.count]
                let lengths = [0, 1, 2, 4096, b - 1, b, b + 1, 2 * b, 3 * b + 5, data.count]
                for offset in offsets {
                    for length in lengths where offset + length <= data.count {
                        XCTAssertEqual(try store.read(id: 42, offset: offset, length: length),
                                       Array(data[offset..<offset + length]),
                                       "\(compression) \(kind) offset \(offset) length \(length)")
                    }
                }
                for _ in 0..<300 {
                    let offset = Int(random.next() % UInt64(data.count + 1))
                    let length = Int(random.next() % UInt64(data.count - offset + 1))
                    XCTAssertEqual(try store.read(id: 42, offset: offset, length: length),
                                   Array(data[offset..<offset + length]),
                                   "seed \(seed) \(compression) \(kind) offset \(offset) length \(length)")
                }
                // Into a caller's buffer.
                var buffer = [UInt8](repeating: 0, count: 3 * b)
                try buffer.withUnsafeMutableBytes { try store.read(id: 42, offset: b - 10, into: $0) }
                XCTAssertEqual(buffer, Array(data[(b - 10)..<(4 * b - 10)]))
            }
        }
    }

    func testRangesOutsideTheObjectAreEINVAL() throws {
        let store = try makeStore()
        try store.write(id: 7, data: [UInt8](repeating: 9, count: 1000))
        assertErrno(EINVAL, try store.read(id: 7, offset: 1001, length: 0))
        assertErrno(EINVAL, try store.read(id: 7, offset: 0, length: 1001))
        assertErrno(EINVAL, try store.read(id: 7, offset: 999, length: 2))
        assertErrno(EINVAL, try store.read(id: 7, offset: -1, length: 1))
        assertErrno(EINVAL, try store.read(id: 7, offset: 0, length: -1))
        assertErrno(EINVAL, try store.read(id: 7, offset: Int.max, length: Int.max))
        XCTAssertEqual(try store.read(id: 7, offset: 1000, length: 0), [])
        XCTAssertEqual(try store.read(id: 7, offset: 999, length: 1), [9])
    }

    /// The file layout matches SPEC.md, checked with an independent parser.
    func testOnDiskLayoutMatchesTheSpecification() throws {
        var random = SeededRandom(seed: 8)
        let data = TestData.mixed(3 * Self.block + 10, &random)
        for compression in Compression.allCases {
            try? FileManager.default.removeItem(atPath: directory)
            let store = try makeStore(compression)
            let id: SliceID = 0x0123_4567_89AB_CDEF
            try store.write(id: id, data: data)
            XCTAssertTrue(FileManager.default.fileExists(atPath: "\(directory)/ef/0123456789abcdef"))
            let bytes = try fileBytes(id)
            let parsed = ParsedObject(bytes)
            XCTAssertEqual(parsed.version, 2)
            XCTAssertEqual(parsed.compression, compression.rawValue)
            XCTAssertEqual(parsed.id, id)
            XCTAssertEqual(parsed.rawLength, data.count)
            XCTAssertEqual(parsed.blockSize, 65536)
            XCTAssertEqual(parsed.blocks.count, 4)
            let headerCRC = bytes[(parsed.headerLength - 4)..<parsed.headerLength].reversed()
                .reduce(UInt32(0)) { $0 << 8 | UInt32($1) }
            XCTAssertEqual(headerCRC, crc32c(Array(bytes[0..<(parsed.headerLength - 4)])))
            XCTAssertEqual(bytes.count, parsed.dataOffset + parsed.blocks.reduce(0) { $0 + $1.storedLength })
            // Whole raw blocks: payloads page-aligned (direct I/O); compressed: right after the header.
            XCTAssertEqual(parsed.dataOffset, compression == .none ? 4096 : parsed.headerLength)
            XCTAssertEqual(bytes[parsed.headerLength..<parsed.dataOffset].filter { $0 != 0 }.count, 0, "padding is zero")
            for (index, block) in parsed.blocks.enumerated() {
                let raw = Array(data[(index * Self.block)..<min(data.count, (index + 1) * Self.block)])
                XCTAssertEqual(block.crc, crc32c(raw), "block \(index)")
                if compression == .none || index % 2 == 1 {  // random blocks never shrink
                    XCTAssertEqual(block.flags, 0, "block \(index)")
                    XCTAssertEqual(Array(bytes[block.fileOffset..<(block.fileOffset + block.storedLength)]), raw)
                } else {
                    XCTAssertEqual(block.flags, 1, "block \(index)")
                    XCTAssertLessThan(block.storedLength, raw.count / 2, "block \(index)")
                }
            }
        }
    }

    func testCompressionShrinksCompressibleDataOnly() throws {
        var random = SeededRandom(seed: 9)
        let text = TestData.compressible(1 << 20, &random)
        let noise = TestData.random(1 << 20, &random)
        let store = try makeStore(.zstd)
        try store.write(id: 1, data: text)
        try store.write(id: 2, data: noise)
        XCTAssertLessThan(try fileBytes(1).count, text.count / 3)
        // Nothing shrank, so the payloads are page-aligned: the header is padded to 4096 bytes.
        XCTAssertEqual(try fileBytes(2).count, noise.count + 4096)
        let plain = try ChunkStore(directory: directory + "-plain", compression: .none, logger: log.logger)
        defer { try? FileManager.default.removeItem(atPath: directory + "-plain") }
        try plain.write(id: 1, data: text)
        XCTAssertEqual(plain.storedBytes, UInt64(text.count + 4096))
    }

    func testObjectsReadBackWhateverTheStoreCompressionSetting() throws {
        var random = SeededRandom(seed: 10)
        let text = TestData.compressible(300_000, &random)
        try makeStore(.zstd).write(id: 5, data: text)
        try makeStore(.none).write(id: 6, data: text)
        for compression in Compression.allCases {
            let store = try makeStore(compression)
            XCTAssertEqual(try store.read(id: 5, offset: 0, length: text.count), text)
            XCTAssertEqual(try store.read(id: 6, offset: 0, length: text.count), text)
        }
    }

    /// SPEC.md §4, Co-located reads: a store opened over another process's chunk directory
    /// reads its objects (compressed or not, checked) and refuses every change with EROFS,
    /// leaving the objects as they were.
    func testAStoreOpenedForReadingReadsEveryObjectAndChangesNothing() throws {
        let writer = try makeStore(.zstd)
        var random = SeededRandom(seed: 56)
        let objects: [SliceID: [UInt8]] = [7: TestData.random(300_000, &random), 8: TestData.compressible(200_000, &random)]
        for (id, data) in objects { try writer.write(id: id, data: data) }
        try writer.sync()
        let root = open(directory, O_RDONLY | O_DIRECTORY | O_CLOEXEC)
        XCTAssertGreaterThanOrEqual(root, 0)
        let reader = ChunkStore(readingFrom: root, directory: directory, logger: log.logger)
        for (id, data) in objects {
            XCTAssertEqual(try reader.read(id: id, offset: 0, length: data.count), data)
            var part = [UInt8](repeating: 0, count: 70_000)
            try part.withUnsafeMutableBytes { try reader.read(id: id, offset: 65_536, into: $0) }
            XCTAssertEqual(part, Array(data[65_536..<135_536]))
        }
        assertErrno(EROFS, try reader.write(id: 9, data: [1, 2, 3]))
        assertErrno(EROFS, try [UInt8](repeating: 0, count: 100).withUnsafeBytes { try reader.writeImage(id: 9, image: $0) })
        assertErrno(EROFS, try reader.delete(id: 7))
        assertErrno(EROFS, try reader.rewriteJournaled(id: 7, raw: [1]))
        assertErrno(EROFS, try reader.restore(id: 7, raw: [1]))
        assertErrno(EROFS, try reader.importObject(id: 9, file: [1]))
        assertErrno(ENOENT, try reader.read(id: 9, offset: 0, length: 1))
        for (id, data) in objects { XCTAssertEqual(try writer.read(id: id, offset: 0, length: data.count), data) }
        XCTAssertFalse(writer.exists(id: 9))
        try corrupt(7, at: 100_000)
        assertErrno(EIO, try reader.read(id: 7, offset: 0, length: 300_000), "checked as any read")
    }
}
