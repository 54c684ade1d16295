import Foundation
@testable import WeftChunks
import WeftProto
import WeftTestSupport
import XCTest

final class ChunkLifecycleTests: ChunkTestCase {
    func testWritingAnExistingIdIsEEXISTAndKeepsTheOriginal() throws {
        let store = try makeStore(.zstd)
        try store.write(id: 1, data: [1, 2, 3])
        assertErrno(EEXIST, try store.write(id: 1, data: [4, 5, 6, 7]))
        XCTAssertEqual(try store.read(id: 1, offset: 0, length: 3), [1, 2, 3])
        XCTAssertEqual(store.objectCount, 1)
        let leftovers = try FileManager.default.contentsOfDirectory(atPath: "\(directory)/01")
        XCTAssertEqual(leftovers, ["0000000000000001"])
    }

    func testDeleteAndExists() throws {
        let store = try makeStore()
        XCTAssertFalse(store.exists(id: 5))
        try store.write(id: 5, data: [UInt8](repeating: 1, count: 100_000))
        XCTAssertTrue(store.exists(id: 5))
        XCTAssertEqual(try store.read(id: 5, offset: 99_999, length: 1), [1])  // cached open
        try store.delete(id: 5)
        XCTAssertFalse(store.exists(id: 5))
        assertErrno(ENOENT, try store.read(id: 5, offset: 0, length: 1))
        assertErrno(ENOENT, try store.length(id: 5))
        try store.delete(id: 5)
        XCTAssertEqual(store.objectCount, 0)
        XCTAssertEqual(store.storedBytes, 0)
        try store.sync()
        // The id can be written again after a delete.
        try store.write(id: 5, data: [7])
        XCTAssertEqual(try store.read(id: 5, offset: 0, length: 1), [7])
    }

    func testAccountingMatchesForEachAndSurvivesReopening() throws {
        var random = SeededRandom(seed: 31)
        let store = try makeStore(.zstd)
        let start = Int64(Date().timeIntervalSince1970 * 1e9) - 2_000_000_000
        var sizes: [SliceID: Int] = [:]
        for index in 0..<300 {
            let id = random.next()
            let length = Int(random.next() % 200_000)
            try store.write(id: id, data: index % 2 == 0 ? TestData.random(length, &random) : TestData.compressible(length, &random))
            sizes[id] = length
        }
        func listing(_ store: ChunkStore) throws -> [SliceID: UInt64] {
            var result: [SliceID: UInt64] = [:]
            try store.forEach { id, stored, modifiedNs in
                XCTAssertNil(result[id])
                XCTAssertGreaterThan(modifiedNs, start)
                result[id] = stored
            }
            return result
        }
        var listed = try listing(store)
        XCTAssertEqual(Set(listed.keys), Set(sizes.keys))
        XCTAssertEqual(store.objectCount, 300)
        XCTAssertEqual(store.storedBytes, listed.values.reduce(0, +))

        for id in sizes.keys.sorted().prefix(100) {
            try store.delete(id: id)
            sizes[id] = nil
        }
        listed = try listing(store)
        XCTAssertEqual(Set(listed.keys), Set(sizes.keys))
        XCTAssertEqual(store.objectCount, 200)
        XCTAssertEqual(store.storedBytes, listed.values.reduce(0, +))
        try store.sync()

        let reopened = try makeStore(.none)
        XCTAssertEqual(reopened.objectCount, 200)
        XCTAssertEqual(reopened.storedBytes, store.storedBytes)
        for (id, length) in sizes {
            XCTAssertEqual(try reopened.verify(id: id), length)
        }
    }

    func testForEachPropagatesErrorsFromItsBody() throws {
        let store = try makeStore()
        try store.write(id: 1, data: [1])
        struct Stop: Error {}
        XCTAssertThrowsError(try store.forEach { _, _, _ in throw Stop() }) { XCTAssertTrue($0 is Stop) }
    }

    func testForEachSkipsForeignFiles() throws {
        let store = try makeStore()
        try store.write(id: 0x22, data: [1])
        for name in ["22/README", "22/00000000000000zz", "23/0000000000000022", "22/000000000000022"] {
            XCTAssertTrue(FileManager.default.createFile(atPath: "\(directory)/\(name)", contents: Data([1])))
        }
        var seen: [SliceID] = []
        try store.forEach { id, _, _ in seen.append(id) }
        XCTAssertEqual(seen, [0x22])
        XCTAssertEqual(try makeStore().objectCount, 1)
    }

    func testSyncMakesWritesAndDeletesDurableAndCanBeRepeated() throws {
        let store = try makeStore()
        try store.sync()  // nothing written
        for id in 0..<20 as Range<SliceID> { try store.write(id: id, data: [UInt8(id)]) }
        try store.sync()
        try store.sync()
        try store.delete(id: 3)
        try store.sync()
        XCTAssertEqual(store.objectCount, 19)
    }

    /// More unsynced objects than the pending bound: writes keep succeeding (they sync on the way).
    /// Besides the pending ones, only the open-object cache holds descriptors (a written object
    /// goes into it, with the layout it was written with).
    func testManyUnsyncedWritesStayBounded() throws {
        let store = try makeStore()
        let before = openDescriptorCount()
        let count = ChunkStore.openObjectCacheCapacity + 1000
        for id in 0..<SliceID(count) { try store.write(id: id, data: [UInt8(truncatingIfNeeded: id)]) }
        XCTAssertLessThanOrEqual(openDescriptorCount() - before, 256 + ChunkStore.openObjectCacheCapacity + 4)
        try store.sync()
        XCTAssertLessThanOrEqual(openDescriptorCount() - before, ChunkStore.openObjectCacheCapacity + 4)
        XCTAssertEqual(store.objectCount, UInt64(count))
    }

    /// A written object is opened from the layout it was written with: the commit's `length`
    /// and the first read need not read its header back from disk. Dropped from the cache, it
    /// is opened from disk again, with the same answers.
    func testAWrittenObjectIsCachedWithItsLayout() throws {
        for compression in [Compression.none, .zstd] {
            let store = try ChunkStore(directory: directory + "/\(compression)", compression: compression,
                                       logger: log.logger)
            let data = (0..<300_000).map { UInt8(truncatingIfNeeded: $0 / 7) }
            try store.write(id: 7, data: data)
            XCTAssertEqual(store.cache.count, 1)
            // The layout it was cached with is the one its header on disk describes.
            let cached = try XCTUnwrap(store.cache.lookup(7).0).layout
            let onDisk = try store.openUncached(7).layout
            XCTAssertEqual([cached.rawLength, cached.dataOffset, cached.fileBytes],
                           [onDisk.rawLength, onDisk.dataOffset, onDisk.fileBytes])
            XCTAssertEqual(cached.blocks.map { [$0.fileOffset, $0.storedLength, Int($0.crc), $0.compressed ? 1 : 0] },
                           onDisk.blocks.map { [$0.fileOffset, $0.storedLength, Int($0.crc), $0.compressed ? 1 : 0] })
            // Its header on disk is not consulted while cached: overwritten, nothing changes.
            let path = store.path(of: 7)
            let original = try Data(contentsOf: URL(fileURLWithPath: path))
            var damaged = original
            damaged[0] ^= 0xFF
            try damaged.write(to: URL(fileURLWithPath: path))
            XCTAssertEqual(try store.length(id: 7), data.count)
            XCTAssertEqual(try store.read(id: 7, offset: 1000, length: 5000), Array(data[1000..<6000]))
            // Opened again from disk, the damaged header is found; restored, the answers agree.
            store.cache.remove(7)
            XCTAssertThrowsError(try store.length(id: 7)) { XCTAssertEqual(($0 as? WeftError)?.errno, EIO) }
            store.cache.remove(7)
            try original.write(to: URL(fileURLWithPath: path))
            XCTAssertEqual(try store.length(id: 7), data.count)
            XCTAssertEqual(try store.read(id: 7, offset: 0, length: data.count), data)
        }
    }

    /// Reading more objects than the cache holds keeps at most its capacity open.
    func testOpenObjectCacheIsBounded() throws {
        let store = try makeStore()
        let count = ChunkStore.openObjectCacheCapacity + 200
        for id in 0..<SliceID(count) { try store.write(id: id, data: [UInt8(truncatingIfNeeded: id), 1, 2]) }
        try store.sync()
        let before = openDescriptorCount()
        for _ in 0..<2 {
            for id in 0..<SliceID(count) {
                XCTAssertEqual(try store.read(id: id, offset: 0, length: 1), [UInt8(truncatingIfNeeded: id)])
            }
        }
        XCTAssertLessThanOrEqual(openDescriptorCount() - before, ChunkStore.openObjectCacheCapacity)
    }

    func testDirectoryIsCreatedWithParents() throws {
        let nested = directory + "/a/b/c"
        let store = try ChunkStore(directory: nested, compression: .none, logger: log.logger)
        try store.write(id: 1, data: [1])
        XCTAssertTrue(FileManager.default.fileExists(atPath: nested + "/01/0000000000000001"))
    }

    func testUnusableDirectoryIsAnError() throws {
        XCTAssertTrue(FileManager.default.createFile(atPath: directory, contents: Data([1])))
        XCTAssertThrowsError(try makeStore())
    }

    private func openDescriptorCount() -> Int {
        (try? FileManager.default.contentsOfDirectory(atPath: "/proc/self/fd").count) ?? 0
    }
}

/// The space reserve (SPEC.md §9.1): data may not take the last free bytes of the disk.
final class ChunkReserveTests: ChunkTestCase {
    func testAnObjectThatWouldEatIntoTheReserveIsENOSPCAndLeavesNothing() throws {
        let store = try makeStore()
        try store.write(id: 1, data: [1, 2, 3])
        let free = try store.space().freeBytes
        XCTAssertGreaterThan(free, 0)
        store.setReserve(free)   // any object would leave less than this free
        XCTAssertEqual(store.reserveBytes, free)
        do {
            try store.write(id: 2, data: [UInt8](repeating: 9, count: 100_000))
            XCTFail("a write into the reserve succeeded")
        } catch let error as WeftError {
            XCTAssertEqual(error.errno, ENOSPC)
            XCTAssertTrue(error.message.contains("hub disk full"), error.message)
        }
        XCTAssertFalse(store.exists(id: 2))
        XCTAssertEqual(try FileManager.default.contentsOfDirectory(atPath: "\(directory)/02"), [],
                       "no temporary file is left behind")
        XCTAssertEqual(store.objectCount, 1)
        // Reads and deletes go on.
        XCTAssertEqual(try store.read(id: 1, offset: 0, length: 3), [1, 2, 3])
        try store.delete(ids: [1, 77])
        XCTAssertFalse(store.exists(id: 1))
        // Without the reserve the same write succeeds.
        store.setReserve(0)
        try store.write(id: 2, data: [UInt8](repeating: 9, count: 100_000))
        XCTAssertEqual(try store.read(id: 2, offset: 99_999, length: 1), [9])
    }

    func testTheDefaultReserveIsFivePercentOfTheFileSystemAtMost256MiB() throws {
        let store = try makeStore()
        XCTAssertEqual(store.reserveBytes, 0, "a store keeps no reserve unless told")
        var disk = statvfs()
        XCTAssertEqual(statvfs(directory, &disk), 0)
        let total = UInt64(disk.f_blocks) * UInt64(disk.f_frsize)
        let reserve = ChunkStore.defaultReserveBytes(directory: directory)
        XCTAssertGreaterThan(reserve, 0)
        XCTAssertLessThanOrEqual(reserve, 256 << 20)
        XCTAssertEqual(reserve, min(total / 20, 256 << 20))
        XCTAssertEqual(ChunkStore.defaultReserveBytes(directory: directory + "/missing"), 0)
    }

    /// An agent's temporary file removed after weftd opened it to take it over and before its
    /// link (a sweep of stale files, fsck --repair) is ENOENT, which sends the agent's object
    /// over TCP; the store's own temporary files keep EIO for the same failure.
    func testALinkOfAnAgentsFileThatWentIsENOENT() throws {
        let store = try makeStore()
        assertErrno(ENOENT, try store.placeTemporary(5, suffix: ChunkStore.adoptedTagBit | 0x99))
        assertErrno(EIO, try store.placeTemporary(5, suffix: 0x99))
        XCTAssertFalse(store.exists(id: 5))
        XCTAssertEqual(store.objectCount, 0)
    }
}
