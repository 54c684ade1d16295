import Foundation
import WeftChunks
import WeftProto
import WeftTestSupport
import XCTest

final class ChunkDamageTests: ChunkTestCase {
    let b = Limits.blockSizeBytes

    /// One flipped byte in block 2 fails every read touching block 2 with EIO and one log line;
    /// the other blocks of the same object still read.
    func testCorruptedBlockIsEIOAndOtherBlocksStillRead() throws {
        for compression in Compression.allCases {
            for kind in ["compressible", "random"] {
                try? FileManager.default.removeItem(atPath: directory)
                var random = SeededRandom(seed: 21)
                let data = kind == "random" ? TestData.random(4 * b, &random) : TestData.compressible(4 * b, &random)
                let store = try makeStore(compression)
                let id: SliceID = 0xABCD
                try store.write(id: id, data: data)
                XCTAssertEqual(try store.read(id: id, offset: 0, length: data.count), data)  // cache the header
                let block2 = ParsedObject(try fileBytes(id)).blocks[2]
                try corrupt(id, at: block2.fileOffset + block2.storedLength / 2)
                let context = "\(compression) \(kind)"

                log.reset()
                assertErrno(EIO, try store.read(id: id, offset: 2 * b + 100, length: 10), context)
                XCTAssertEqual(log.errors.count, 1, "\(context) \(log.errors)")
                let line = log.errors.first ?? ""
                XCTAssertTrue(line.contains("000000000000abcd"), line)
                XCTAssertTrue(line.contains(objectPath(id)), line)
                XCTAssertTrue(line.contains("block 2"), line)

                assertErrno(EIO, try store.read(id: id, offset: b, length: 2 * b), context)
                assertErrno(EIO, try store.read(id: id, offset: 0, length: data.count), context)
                assertErrno(EIO, try store.verify(id: id), context)
                for block in [0, 1, 3] {
                    XCTAssertEqual(try store.read(id: id, offset: block * b, length: b),
                                   Array(data[(block * b)..<((block + 1) * b)]), "\(context) block \(block)")
                }
                XCTAssertEqual(try store.read(id: id, offset: 0, length: 2 * b), Array(data[0..<(2 * b)]), context)
                // A cold store sees the same.
                let fresh = try makeStore(compression)
                assertErrno(EIO, try fresh.read(id: id, offset: 2 * b, length: 1), context)
                XCTAssertEqual(try fresh.read(id: id, offset: 3 * b, length: b), Array(data[(3 * b)...]), context)
            }
        }
    }

    func testEveryHeaderByteIsProtected() throws {
        var random = SeededRandom(seed: 22)
        let data = TestData.mixed(3 * b + 5, &random)
        try makeStore(.zstd).write(id: 3, data: data)
        let original = try fileBytes(3)
        let headerLength = ParsedObject(original).headerLength
        for offset in 0..<headerLength {
            var damaged = original
            damaged[offset] ^= 0x5A
            try setFileBytes(3, damaged)
            log.reset()
            let store = try makeStore()
            assertErrno(EIO, try store.read(id: 3, offset: 0, length: 1), "header byte \(offset)")
            assertErrno(EIO, try store.length(id: 3), "header byte \(offset)")
            XCTAssertEqual(log.errors.count, 2, "header byte \(offset): \(log.errors)")
            XCTAssertTrue(log.errors.allSatisfy { $0.contains("header") && $0.contains(objectPath(3)) }, "\(log.errors)")
        }
        try setFileBytes(3, original)
        XCTAssertEqual(try makeStore().read(id: 3, offset: 0, length: data.count), data)
    }

    func testTruncatedOrExtendedFilesAreEIO() throws {
        var random = SeededRandom(seed: 23)
        let data = TestData.random(3 * b, &random)
        try makeStore().write(id: 4, data: data)
        let original = try fileBytes(4)
        for length in [0, 1, 10, 35, 36, 71, 72, 100, original.count / 2, original.count - 1] {
            try setFileBytes(4, Array(original[0..<length]))
            assertErrno(EIO, try makeStore().read(id: 4, offset: 0, length: 1), "truncated to \(length)")
            assertErrno(EIO, try makeStore().verify(id: 4), "truncated to \(length)")
        }
        try setFileBytes(4, original + [0])
        assertErrno(EIO, try makeStore().read(id: 4, offset: 0, length: 1), "extended")
    }

    /// A store that has the header cached notices a file truncated under it.
    func testTruncationAfterOpenIsEIO() throws {
        var random = SeededRandom(seed: 24)
        let data = TestData.random(3 * b, &random)
        let store = try makeStore()
        try store.write(id: 5, data: data)
        XCTAssertEqual(try store.read(id: 5, offset: 0, length: 10), Array(data[0..<10]))
        XCTAssertEqual(truncate(objectPath(5), off_t(ParsedObject(try fileBytes(5)).dataOffset + b + 7)), 0)
        XCTAssertEqual(try store.read(id: 5, offset: 0, length: b), Array(data[0..<b]))
        log.reset()
        assertErrno(EIO, try store.read(id: 5, offset: b, length: 2 * b))
        XCTAssertEqual(log.errors.count, 1, "\(log.errors)")
    }

    /// Crafted headers with valid checksums but absurd fields fail cleanly, without allocating.
    func testCraftedHeadersWithValidChecksumAreRejected() throws {
        try makeStore().write(id: 6, data: [UInt8](repeating: 1, count: 100))
        let original = try fileBytes(6)
        func craft(_ edit: (inout [UInt8]) -> Void) -> [UInt8] {
            var bytes = original
            edit(&bytes)
            let checksumAt = 32 + 12 * 1
            let crc = crc32c(Array(bytes[0..<checksumAt]))
            for i in 0..<4 { bytes[checksumAt + i] = UInt8(truncatingIfNeeded: crc >> (8 * UInt32(i))) }
            return bytes
        }
        func put32(_ bytes: inout [UInt8], _ at: Int, _ value: UInt32) {
            for i in 0..<4 { bytes[at + i] = UInt8(truncatingIfNeeded: value >> (8 * UInt32(i))) }
        }
        let cases: [(String, [UInt8])] = [
            ("version 3", craft { $0[4] = 3 }),
            ("version 0", craft { $0[4] = 0 }),
            ("data offset before the header end", craft { put32(&$0, 28, 47) }),
            ("data offset a page past the header", craft { put32(&$0, 28, 48 + 4096) }),
            ("version 1 with a data offset", craft { $0[4] = 1; put32(&$0, 28, 48) }),
            ("compression 9", craft { $0[5] = 9 }),
            ("reserved", craft { $0[6] = 1 }),
            ("huge raw length", craft { put32(&$0, 16, UInt32.max) }),
            ("block size", craft { put32(&$0, 20, 4096) }),
            ("huge block count", craft { put32(&$0, 24, UInt32.max) }),
            ("zero block count", craft { put32(&$0, 24, 0) }),
            ("stored length", craft { put32(&$0, 32, 99) }),
            ("huge stored length", craft { put32(&$0, 32, UInt32.max) }),
            ("unknown flag", craft { $0[40] = 2 }),
            ("compressed flag on raw block", craft { $0[40] = 1 }),
            ("table reserved", craft { $0[41] = 1 }),
            ("id of another chunk", craft { $0[8] = 7 }),
        ]
        for (name, bytes) in cases {
            try setFileBytes(6, bytes)
            assertErrno(EIO, try makeStore().read(id: 6, offset: 0, length: 1), name)
        }
        // A flipped crc in the table: the header checks out, the block does not.
        try setFileBytes(6, craft { $0[36] ^= 1 })
        let store = try makeStore()
        XCTAssertEqual(try store.length(id: 6), 100)
        assertErrno(EIO, try store.read(id: 6, offset: 0, length: 1))
    }

    func testRandomGarbageFilesAreEIONeverACrash() throws {
        var random = SeededRandom(seed: 25)
        _ = try makeStore()
        for round in 0..<200 {
            let length = Int(random.next() % 20_000)
            var bytes = TestData.random(length, &random)
            if round % 2 == 0 && length >= 4 { bytes[0..<4] = ArraySlice("WFTC".utf8) }
            if round % 4 == 0 && length >= 5 { bytes[4] = 1 }
            try setFileBytes(8, bytes)
            assertErrno(EIO, try makeStore().read(id: 8, offset: 0, length: 0), "seed 25 round \(round)")
        }
    }

    /// An object file stored under another id's name is not served as that id.
    func testMisplacedFileIsEIO() throws {
        let store = try makeStore()
        try store.write(id: 0x101, data: [1, 2, 3])
        try FileManager.default.createDirectory(atPath: (objectPath(0x201) as NSString).deletingLastPathComponent,
                                                withIntermediateDirectories: true)
        try FileManager.default.copyItem(atPath: objectPath(0x101), toPath: objectPath(0x201))
        assertErrno(EIO, try store.read(id: 0x201, offset: 0, length: 3))
    }

    func testMissingObjects() throws {
        let store = try makeStore()
        assertErrno(ENOENT, try store.read(id: 99, offset: 0, length: 0))
        assertErrno(ENOENT, try store.length(id: 99))
        assertErrno(ENOENT, try store.verify(id: 99))
        XCTAssertFalse(store.exists(id: 99))
        XCTAssertNoThrow(try store.delete(id: 99))
        XCTAssertTrue(log.errors.isEmpty, "\(log.errors)")
    }

    /// A crash mid-write leaves only a temporary file, which is invisible and removed at start-up.
    func testInterruptedWriteIsInvisibleAndCleanedUp() throws {
        var store: ChunkStore? = try makeStore()
        try store!.write(id: 0x10, data: [UInt8](repeating: 5, count: 70_000))
        let bytes = try fileBytes(0x10)
        store = nil
        let temporary = "\(directory)/11/0000000000000011.0000abcd.tmp"
        try Data(bytes[0..<50_000]).write(to: URL(fileURLWithPath: temporary))
        XCTAssertTrue(FileManager.default.fileExists(atPath: temporary))
        store = try makeStore()
        XCTAssertFalse(FileManager.default.fileExists(atPath: temporary))
        XCTAssertFalse(store!.exists(id: 0x11))
        XCTAssertEqual(store!.objectCount, 1)
        XCTAssertEqual(store!.storedBytes, UInt64(bytes.count))
        var seen: [SliceID] = []
        try store!.forEach { id, _, _ in seen.append(id) }
        XCTAssertEqual(seen, [0x10])
    }
}
