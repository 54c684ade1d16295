#if canImport(Glibc)
import Glibc
#endif
import Foundation
import WeftTestSupport
import XCTest
import WeftProto
@testable import WeftMeta

/// The metadata journal (SPEC.md §3.3): what a crash leaves is recovered from it, a torn tail is
/// ignored, damage is reported, laps wrap, old volumes are upgraded.
///
/// A crash is a copy of the volume's directory taken while the store is open, after a sync and
/// with RocksDB idle: RocksDB's files then hold the last checkpoint only (it writes memtables out
/// at checkpoints), and everything since is in the journal, as after a `kill -9`.
final class MetaJournalTests: MetaStoreTestCase {
    private var crashCount = 0

    /// A copy of the open volume as a crash would leave it (see the class comment).
    private func crashImage() throws -> String {
        try store.sync()
        let deadline = Date().addingTimeInterval(10)
        while store.db.backgroundWorkPending && Date() < deadline { usleep(10_000) }
        XCTAssertFalse(store.db.backgroundWorkPending, "RocksDB still busy: the copy would not be a crash image")
        crashCount += 1
        let copy = directory + "/crash-\(crashCount)"
        try FileManager.default.copyItem(atPath: path, toPath: copy)
        return copy
    }

    /// Opens a crash image; with `missing`, the replay is told those chunk objects are not on
    /// the disk (every other one is).
    private func open(_ copy: String, geometry: MetaJournal.Geometry = .init(),
                      missing: Set<SliceID>? = nil) throws -> MetaStore {
        try MetaStore(path: copy, durability: .strict, journalGeometry: geometry, logger: testLogger("weft.meta.crash"),
                      objectCheck: missing.map { missing in { _ in { !missing.contains($0) } } })
    }

    private func names(in store: MetaStore) throws -> Set<String> {
        Set(try store.readdir(Callers.root, ino: root, after: nil, limit: 100_000)
            .map { String(decoding: $0.name, as: UTF8.self) }.filter { $0 != "." && $0 != ".." })
    }

    private func flipByte(of file: String, at offset: Int) throws {
        let handle = try XCTUnwrap(FileHandle(forUpdatingAtPath: file))
        defer { try? handle.close() }
        try handle.seek(toOffset: UInt64(offset))
        let byte = try XCTUnwrap(handle.readData(ofLength: 1).first)
        try handle.seek(toOffset: UInt64(offset))
        handle.write(Data([byte ^ 0x5a]))
    }

    func testChangesSinceTheLastCheckpointAreReplayedFromTheJournal() throws {
        for index in 0..<50 { try makeFile("f\(index)") }
        try store.rename(Callers.root, parent: root, name: bytes("f0"), newParent: root, newName: bytes("moved"), flags: [])
        try store.unlink(Callers.root, parent: root, name: bytes("f1"))
        let counters = store.counters
        let copy = try crashImage()

        // RocksDB's files alone do not have them: the journal is what keeps them.
        do {
            let rocksOnly = try RocksDB(path: copy, createIfMissing: false)
            XCTAssertNil(try rocksOnly.get(Key.entry(root, bytes("f10"))))
        }

        let recovered = try open(copy)
        XCTAssertEqual(recovered.journalRecovery.replayedRecords, 52)
        XCTAssertEqual(recovered.journalRecovery.skippedRecords, 0)
        var expected = Set((2..<50).map { "f\($0)" })
        expected.insert("moved")
        XCTAssertEqual(try names(in: recovered), expected)
        XCTAssertEqual(recovered.counters, counters)
        XCTAssertEqual(try recovered.checkMetadata(repair: false).problems, [])
        // The replay was checkpointed: a second crash right after opening loses nothing either.
        XCTAssertEqual(recovered.journal.tailOffset, MetaJournal.recordsStart)
    }

    func testATornLastRecordIsDroppedAndEverythingBeforeItKept() throws {
        for index in 0..<10 { try makeFile("f\(index)") }
        let lastRecord = store.journal.tailOffset
        try makeFile("torn")
        let copy = try crashImage()
        try flipByte(of: MetaJournal.path(inDirectory: copy), at: lastRecord + MetaJournal.recordHeaderBytes + 5)

        let recovered = try open(copy)
        XCTAssertEqual(recovered.journalRecovery.replayedRecords, 10)
        XCTAssertEqual(recovered.journalRecovery.skippedRecords, 0)
        XCTAssertEqual(try names(in: recovered), Set((0..<10).map { "f\($0)" }))
        XCTAssertEqual(try recovered.checkMetadata(repair: false).problems, [])
    }

    func testDamageInTheMiddleOfALapStopsTheReplayAndIsReported() throws {
        var offsets: [Int] = []
        for index in 0..<10 {
            offsets.append(store.journal.tailOffset)
            try makeFile("f\(index)")
        }
        let copy = try crashImage()
        try flipByte(of: MetaJournal.path(inDirectory: copy), at: offsets[4] + 2)

        let recovered = try open(copy)
        XCTAssertEqual(recovered.journalRecovery.replayedRecords, 4)
        XCTAssertEqual(recovered.journalRecovery.skippedRecords, 5, "the intact records after the damage are counted")
        XCTAssertEqual(try names(in: recovered), Set((0..<4).map { "f\($0)" }))
    }

    func testLapsWrapWithCheckpointsAndTheJournalStaysWithinItsSize() throws {
        let geometry = MetaJournal.Geometry(growthStepBytes: 16 << 10, maxBytes: 64 << 10, largestRecordBytes: 8 << 10)
        try store.close()
        store = nil
        store = try open(path, geometry: geometry)
        var furthest = 0
        for index in 0..<1500 {
            try makeFile("f\(index)")
            furthest = max(furthest, store.journal.tailOffset)
        }
        for index in stride(from: 0, to: 1500, by: 3) {
            try store.unlink(Callers.root, parent: root, name: bytes("f\(index)"))
            furthest = max(furthest, store.journal.tailOffset)
        }
        XCTAssertGreaterThan(store.journal.lap, 5, "1,500 creates of about 300 bytes each cross a 64 KiB journal")
        XCTAssertLessThanOrEqual(furthest, 64 << 10, "records stay within the journal's size")
        let counters = store.counters
        let copy = try crashImage()

        let recovered = try open(copy, geometry: geometry)
        XCTAssertEqual(try names(in: recovered), Set((0..<1500).filter { $0 % 3 != 0 }.map { "f\($0)" }))
        XCTAssertEqual(recovered.counters, counters)
        XCTAssertEqual(try recovered.checkMetadata(repair: false).problems, [])
    }

    /// The memtable bound rests on RocksDB reporting its memtable's size (an unknown property
    /// would read 0 and RocksDB would write memtables out on its own, ahead of the journal).
    func testTheMemtableSizeIsReportedAndACheckpointEmptiesIt() throws {
        let before = store.db.activeMemtableBytes
        for index in 0..<200 { try makeFile("f\(index)") }
        let grown = store.db.activeMemtableBytes
        XCTAssertGreaterThan(grown, before + 200 * 100, "200 creates add at least 100 bytes each to the memtable")
        store.lock.lock()
        defer { store.lock.unlock() }
        try store.checkpoint()
        XCTAssertLessThan(store.db.activeMemtableBytes, grown / 2)
        XCTAssertEqual(store.journal.tailOffset, MetaJournal.recordsStart)
    }

    func testABatchTooLargeForARecordIsWrittenOutAtOnce() throws {
        let geometry = MetaJournal.Geometry(growthStepBytes: 16 << 10, maxBytes: 64 << 10, largestRecordBytes: 4 << 10)
        try store.close()
        store = nil
        store = try open(path, geometry: geometry)
        let file = try makeFile("big")
        let lapBefore = store.journal.lap
        let value = [UInt8]((0..<32_768).map { UInt8(truncatingIfNeeded: $0 &* 7) })
        try store.setxattr(Callers.root, ino: file.ino, name: bytes("user.big"), value: value, flags: [])
        XCTAssertEqual(store.journal.lap, lapBefore + 1, "a batch over the record limit is checkpointed")
        try makeFile("after")
        let copy = try crashImage()

        let recovered = try open(copy, geometry: geometry)
        XCTAssertEqual(try recovered.getxattr(Callers.root, ino: file.ino, name: bytes("user.big")), value)
        XCTAssertEqual(try names(in: recovered), ["big", "after"])
    }

    func testAVolumeOfFormat1GetsAJournalAndFormat2() throws {
        let file = try makeFile("old")
        try store.close()
        store = nil
        // Make it a volume as an older Weft left it: format 1, no journal.
        try FileManager.default.removeItem(atPath: MetaJournal.path(inDirectory: path))
        do {
            let database = try RocksDB(path: path, createIfMissing: false)
            var volume = try XCTUnwrap(try database.get(Key.volume)).decode { try VolumeInfo.decode(from: &$0) }
            volume.formatVersion = 1
            var writer = ByteWriter()
            volume.encode(into: &writer)
            let batch = WriteBatch()
            batch.put(Key.volume, writer.bytes)
            try database.write(batch, sync: true)
        }
        store = try MetaStore(path: path, durability: .strict, logger: testLogger("weft.meta.test"))
        XCTAssertEqual(store.volume.formatVersion, 2)
        XCTAssertTrue(MetaJournal.exists(inDirectory: path))
        XCTAssertEqual(try lookup("old").ino, file.ino)
        try makeFile("new")
        let copy = try crashImage()
        let recovered = try open(copy)
        XCTAssertEqual(recovered.volume.formatVersion, 2)
        XCTAssertEqual(try names(in: recovered), ["old", "new"])
    }

    func testAFormat2VolumeWithoutItsJournalIsRefused() throws {
        try makeFile("x")
        let copy = try crashImage()
        try FileManager.default.removeItem(atPath: MetaJournal.path(inDirectory: copy))
        XCTAssertErrno(EIO, try open(copy))
    }

    func testAJournalWithBothSuperblocksDamagedIsRefused() throws {
        try makeFile("x")
        let copy = try crashImage()
        let journal = MetaJournal.path(inDirectory: copy)
        try flipByte(of: journal, at: 3)
        try flipByte(of: journal, at: MetaJournal.superblockSlotBytes + 3)
        XCTAssertErrno(EIO, try open(copy))
    }

    func testTheFileGrowsInStepsAndALapReplaysOnlyItsOwnRecords() throws {
        let journalDirectory = directory + "/journal-only"
        try FileManager.default.createDirectory(atPath: journalDirectory, withIntermediateDirectories: true)
        let geometry = MetaJournal.Geometry(growthStepBytes: 16 << 10, maxBytes: 64 << 10, largestRecordBytes: 8 << 10)
        try MetaJournal.create(inDirectory: journalDirectory, geometry: geometry)
        var (journal, _) = try MetaJournal.open(inDirectory: journalDirectory, geometry: geometry,
                                                logger: testLogger("weft.journal")) { _ in }
        var appended: [[UInt8]] = []
        while true {
            let payload = [UInt8]((0..<(100 + appended.count % 13)).map { UInt8(truncatingIfNeeded: $0 + appended.count) })
            guard try payload.withUnsafeBytes({ try journal.append($0) }) != nil else { break }
            appended.append(payload)
            XCTAssertEqual(journal.fileBytes % (16 << 10), 0)
        }
        XCTAssertEqual(journal.fileBytes, 64 << 10, "it grew to its size, then refused")
        try journal.sync()
        var replayed: [[UInt8]] = []
        (journal, _) = try MetaJournal.open(inDirectory: journalDirectory, geometry: geometry,
                                            logger: testLogger("weft.journal")) { replayed.append(Array($0)) }
        XCTAssertEqual(replayed, appended)

        try journal.startLap()
        _ = try [UInt8](repeating: 9, count: 40).withUnsafeBytes { try journal.append($0) }
        try journal.sync()
        replayed = []
        (journal, _) = try MetaJournal.open(inDirectory: journalDirectory, geometry: geometry,
                                            logger: testLogger("weft.journal")) { replayed.append(Array($0)) }
        XCTAssertEqual(replayed, [[UInt8](repeating: 9, count: 40)], "the previous lap's records are not replayed")
    }

    func testOneDamagedSuperblockFallsBackToTheOther() throws {
        // Lap 2 (slot 0) is current after the open's checkpoint; damaging it falls back to lap 1,
        // whose records were all checkpointed: nothing is replayed and nothing is lost.
        for index in 0..<3 { try makeFile("f\(index)") }
        try reopen()
        let copy = try crashImage()
        let lap = store.journal.lap
        try flipByte(of: MetaJournal.path(inDirectory: copy), at: Int(lap % 2) * MetaJournal.superblockSlotBytes + 20)
        let recovered = try open(copy)
        XCTAssertEqual(recovered.journalRecovery.lap, lap - 1)
        XCTAssertEqual(try names(in: recovered), ["f0", "f1", "f2"])
    }

    // MARK: objects lost with unsynced commits (SPEC.md §5)

    /// Commits one new object (a slice of `length` bytes at `offset` of chunk 0) to `file`.
    @discardableResult
    private func commitObject(to file: Attributes, offset: UInt32 = 0, length: UInt32 = 4096,
                              journaled: [UInt8]? = nil) throws -> SliceID {
        let id = try store.allocateSliceIDs(count: 1)
        let slice = Slice(id: id, offsetInChunk: offset, length: length, objectLength: length)
        _ = try store.commitSlices(ino: file.ino, slices: [SliceCommit(chunkIndex: 0, slice: slice)],
                                   minimumSize: UInt64(offset + length), durable: false,
                                   journaled: journaled.map { [(id: id, bytes: $0)] } ?? [])
        return id
    }

    private func objects(of file: Attributes, in store: MetaStore) throws -> [SliceID] {
        try store.layout(ino: file.ino, firstChunk: 0, count: 1).1.first?.map(\.id) ?? []
    }

    func testAnObjectAChangeAddedThatIsNotOnTheDiskIsReportedAndNothingChanges() throws {
        let a = try makeFile("a"), b = try makeFile("b")
        let kept = try commitObject(to: a)
        let lost = try commitObject(to: a, offset: 4096, length: 8192)
        try makeFile("after")
        let later = try commitObject(to: b)

        let recovered = try open(try crashImage(), missing: [lost])
        XCTAssertEqual(recovered.objectsMissingAtOpen, [lost])
        XCTAssertEqual(try objects(of: a, in: recovered), [kept, lost], "reported, not changed: reads and fsck name it")
        XCTAssertEqual(try recovered.getattr(a.ino).size, 12288)
        XCTAssertEqual(try objects(of: b, in: recovered), [later])
        XCTAssertEqual(try names(in: recovered), ["a", "b", "after"])
        // Everything on the disk: nothing to report.
        XCTAssertEqual(try open(try crashImage(), missing: []).objectsMissingAtOpen, [])
    }

    func testOnlyObjectsAChangeAddsAreLookedFor() throws {
        let a = try makeFile("a")
        let old = try commitObject(to: a)
        store.lock.lock()
        try store.checkpoint()   // `old` is in RocksDB's files now, not in the lap
        store.lock.unlock()
        let new = try commitObject(to: a, offset: 4096, length: 8192)
        var looked: [SliceID] = []
        let lock = NSLock()
        let recovered = try MetaStore(path: try crashImage(), durability: .strict, logger: testLogger("weft.meta.crash"),
                                      objectCheck: { _ in { id in lock.withLock { looked.append(id) }; return id != old } })
        XCTAssertEqual(lock.withLock { looked }, [new], "the change that only keeps `old` does not add it")
        XCTAssertEqual(recovered.objectsMissingAtOpen, [])
    }

    func testAnObjectWhoseBytesTheChangeCarriesOrThatALaterChangeRemovedIsNotReported() throws {
        let a = try makeFile("a"), b = try makeFile("b")
        let journaled = try commitObject(to: a, journaled: [UInt8](repeating: 9, count: 4096))
        let collected = try commitObject(to: b)
        _ = try store.setattr(Callers.root, ino: b.ino, SetAttributes(size: 0))   // `collected` becomes garbage
        let recovered = try open(try crashImage(), missing: [journaled, collected])
        XCTAssertEqual(recovered.objectsMissingAtOpen, [], "the hub writes the first again; the second is garbage")
        XCTAssertEqual(try objects(of: a, in: recovered), [journaled])
        XCTAssertEqual(try objects(of: b, in: recovered), [])
    }
}
