#if canImport(Glibc)
import Glibc
#endif
import Foundation
import Synchronization
import WeftTestSupport
import XCTest
import WeftHub
import WeftProto

/// Small objects whose durability the metadata journal carries (SPEC.md §5, "Small objects in
/// the journal"): a durable commit syncs none of them, and a crash that lost or damaged one
/// before it reached the disk is repaired from the journal at the next open. Runs in process
/// and over TCP (`RemoteHubConformanceTests`). Each test opens its own volume with background
/// maintenance stopped, so that nothing syncs the objects behind its back.
extension HubConformanceTests {
    /// A volume of 1 MiB chunks (objects up to 1 MiB, past the 64 KiB journaled bound), with a
    /// session and an empty file.
    private func journaledVolume(compression: Compression = .none) throws
        -> (volume: HubUnderTest, context: RequestContext, file: Attributes) {
        let volume = try makeHub(chunkSizeBytes: 1 << 20, compression: compression, recover: false)
        let context = RequestContext(session: try volume.api.openSession(agentName: "journaled").0, credentials: rootCaller)
        let file = try volume.api.create(context, parent: root, name: bytes("f"), mode: regularFile | 0o644, rdev: 0,
                                         umask: 0, exclusive: true)
        return (volume, context, file)
    }

    private func pattern(_ count: Int, seed: UInt8) -> [UInt8] {
        (0..<count).map { UInt8(truncatingIfNeeded: $0 &* 31 &+ Int(seed)) }
    }

    /// Writes `data` as one new object and commits it durably at the start of `file`.
    private func commitDurably(_ data: [UInt8], to file: Attributes, on volume: HubUnderTest,
                               _ context: RequestContext) throws -> Slice {
        let slice = try writeObject(data, on: volume.api, context: context)
        _ = try volume.api.commitSlices(context, ino: file.ino, slices: [SliceCommit(chunkIndex: 0, slice: slice)],
                                        minimumSize: UInt64(data.count), durable: true)
        return slice
    }

    /// Closes the volume as a crash leaves the objects the journal carries, damages object
    /// `id`'s file meanwhile, and opens it again (without background maintenance).
    private func reopen(_ volume: HubUnderTest, damaging id: SliceID, with damage: (String) -> Void) throws -> RequestContext {
        guard let path = volume.chunkFile(of: id) else {
            XCTFail("object \(id) has no file")
            return context
        }
        try volume.restart(syncingJournaled: false, recover: false) { damage(path) }
        return RequestContext(session: try volume.api.openSession(agentName: "after").0, credentials: rootCaller)
    }

    func testADurableCommitCarriesItsSmallObjectsInTheJournalAndALostOneIsWrittenAgainAtOpen() throws {
        for compression in [Compression.none, .zstd] {
            try checkALostJournaledObjectIsWrittenAgain(compression: compression)
        }
    }

    private func checkALostJournaledObjectIsWrittenAgain(compression: Compression) throws {
        let (volume, context, file) = try journaledVolume(compression: compression)
        let smallBytes = pattern(4096, seed: 1)
        let bigBytes = pattern(100_000, seed: 2)
        // Both ids first: allocating ids is a durable change, whose sync pass would sync an
        // object written before it.
        let first = try volume.api.allocateSliceIDs(context, count: 2)
        try volume.api.writeSlice(context, id: first, data: smallBytes)
        try volume.api.writeSlice(context, id: first + 1, data: bigBytes)
        let small = Slice(id: first, offsetInChunk: 0, length: 4096, objectLength: 4096)
        let big = Slice(id: first + 1, offsetInChunk: 4096, length: 100_000, objectLength: 100_000)
        _ = try volume.api.commitSlices(context, ino: file.ino, slices: [SliceCommit(chunkIndex: 0, slice: small),
                                                                       SliceCommit(chunkIndex: 0, slice: big)],
                                        minimumSize: 104_096, durable: true)
        XCTAssertEqual(try volume.hub.meta.journaledObjects().map(\.id), [small.id],
                       "the small object's bytes are in the journal, the one past 64 KiB's are not")
        XCTAssertEqual(volume.hub.chunks.journaledCount, 1, "the small object was left out of the sync pass")
        // A commit that promises no durability (a close) journals its small object too, so that
        // the next durable change need not sync it first; its record is durable with that change.
        let otherBytes = pattern(100, seed: 3)
        var other = try writeObject(otherBytes, on: volume.api, context: context)
        other.offsetInChunk = 200_000
        _ = try volume.api.commitSlices(context, ino: file.ino, slices: [SliceCommit(chunkIndex: 0, slice: other)],
                                        minimumSize: 200_100, durable: false)
        XCTAssertEqual(try volume.hub.meta.journaledObjects().map(\.id).sorted(), [small.id, other.id])
        XCTAssertEqual(volume.hub.chunks.journaledCount, 2, "left out of the sync passes")
        try volume.api.sync(context)   // the journal record of the close, made durable

        // A crash before the objects reached the disk: their files are gone.
        guard let otherPath = volume.chunkFile(of: other.id) else { return XCTFail("object \(other.id) has no file") }
        let after = try reopen(volume, damaging: small.id) { path in
            XCTAssertEqual(unlink(path), 0)
            XCTAssertEqual(unlink(otherPath), 0)
        }
        XCTAssertEqual(try volume.api.readSlice(after, id: other.id, offset: 0, length: 100), otherBytes)
        XCTAssertEqual(try volume.api.readSlice(after, id: small.id, offset: 0, length: 4096), smallBytes)
        XCTAssertEqual(try volume.api.readSlice(after, id: big.id, offset: 0, length: 100_000), bigBytes)
        XCTAssertEqual(try volume.hub.meta.journaledObjects().count, 0, "every key is dropped once the store is synced")
        XCTAssertEqual(try volume.api.fsck(repair: false).problems, [])
    }

    func testAJournaledObjectADamagedFileHoldsIsWrittenAgainAtOpen() throws {
        let (volume, context, file) = try journaledVolume()
        let data = pattern(3000, seed: 7)
        let slice = try commitDurably(data, to: file, on: volume, context)
        XCTAssertEqual(volume.hub.chunks.journaledCount, 1)
        // The file reached the disk with its size but not all of its bytes: the last ones read as zeros.
        let after = try reopen(volume, damaging: slice.id) { path in
            let fd = open(path, O_WRONLY)
            XCTAssertGreaterThanOrEqual(fd, 0)
            var size = stat()
            XCTAssertEqual(fstat(fd, &size), 0)
            XCTAssertEqual(pwrite(fd, [UInt8](repeating: 0, count: 512), 512, off_t(size.st_size) - 512), 512)
            close(fd)
        }
        XCTAssertEqual(try volume.api.readSlice(after, id: slice.id, offset: 0, length: 3000), data)
        XCTAssertEqual(try volume.api.fsck(repair: false).problems, [])
    }

    /// An object that reads back whole at open is written again all the same: the read may
    /// come from pages a failed writeback left clean in the page cache, never written.
    func testAJournaledObjectThatReadsBackWholeIsStillWrittenAgainAtOpen() throws {
        let (volume, context, file) = try journaledVolume()
        let data = pattern(2000, seed: 11)
        let slice = try commitDurably(data, to: file, on: volume, context)
        let path = try XCTUnwrap(volume.chunkFile(of: slice.id))
        var before = stat()
        XCTAssertEqual(stat(path, &before), 0)
        let after = try reopen(volume, damaging: slice.id) { _ in }
        var now = stat()
        XCTAssertEqual(stat(path, &now), 0)
        // A new file (its inode number may be the one just freed): written after the first.
        let written = { (info: stat) in Int64(info.st_mtim.tv_sec) * 1_000_000_000 + Int64(info.st_mtim.tv_nsec) }
        XCTAssertGreaterThan(written(now), written(before), "a new file from the journal's bytes")
        XCTAssertEqual(try volume.api.readSlice(after, id: slice.id, offset: 0, length: 2000), data)
        XCTAssertEqual(try volume.hub.meta.journaledObjects().count, 0)
        XCTAssertEqual(try volume.api.fsck(repair: false).problems, [])
    }

    func testAJournaledObjectThatBecameGarbageIsNotWrittenAgain() throws {
        let (volume, context, file) = try journaledVolume()
        let slice = try commitDurably(pattern(4096, seed: 9), to: file, on: volume, context)
        _ = try volume.api.setattr(context, ino: file.ino, SetAttributes(size: 0))
        let after = try reopen(volume, damaging: slice.id) { path in XCTAssertEqual(unlink(path), 0) }
        XCTAssertNil(volume.chunkFile(of: slice.id), "a garbage object is not brought back")
        XCTAssertEqual(try volume.api.getattr(after, ino: file.ino).size, 0)
        XCTAssertEqual(try volume.api.fsck(repair: false).problems, [])
    }

    func testTheBackgroundSyncOfJournaledObjectsDropsTheirKeysAndAFailedCommitGivesThemBack() throws {
        let (volume, context, file) = try journaledVolume()
        _ = try commitDurably(pattern(4096, seed: 11), to: file, on: volume, context)
        XCTAssertEqual(volume.hub.chunks.journaledCount, 1)
        try volume.hub.syncJournaledObjects()
        XCTAssertEqual(volume.hub.chunks.journaledCount, 0)
        XCTAssertEqual(try volume.hub.meta.journaledObjects().count, 0)
        // A durable commit that fails (the file is a directory) leaves no key, and its object
        // goes back to the sync passes.
        let directory = try volume.api.mkdir(context, parent: root, name: bytes("d"), mode: directoryType | 0o755, umask: 0)
        let refused = try writeObject(pattern(10, seed: 12), on: volume.api, context: context)
        XCTAssertErrno(EINVAL, try volume.api.commitSlices(context, ino: directory.ino,
                                                           slices: [SliceCommit(chunkIndex: 0, slice: refused)],
                                                           minimumSize: 10, durable: true))
        XCTAssertEqual(volume.hub.chunks.journaledCount, 0)
        XCTAssertEqual(try volume.hub.meta.journaledObjects().count, 0)
    }

    /// A failed sync pass of the objects the journal carries (a `syncfs` that reports a
    /// writeback error) may leave their pages clean but never written: each is written again
    /// from its key at once, and the next pass syncs it. Before, it read as damage once its
    /// pages were evicted, until the hub restarted (SPEC.md §5).
    func testAFailedSyncOfJournaledObjectsWritesThemAgainFromTheirKeys() throws {
        for compression in [Compression.none, .zstd] {
            let (volume, context, file) = try journaledVolume(compression: compression)
            let data = pattern(4096, seed: 21)
            let slice = try commitDurably(data, to: file, on: volume, context)
            let path = try XCTUnwrap(volume.chunkFile(of: slice.id))
            // What a writeback error leaves once the pages are gone: other bytes on disk.
            let damaged = try XCTUnwrap(FileManager.default.contents(atPath: path))
            try Data(damaged.map { $0 ^ 0x5A }).write(to: URL(fileURLWithPath: path))
            XCTAssertErrno(EIO, try volume.api.readSlice(context, id: slice.id, offset: 0, length: 4096), "the damage reads as EIO")
            volume.hub.chunks.testSyncfsFailure = { EIO }
            volume.hub.chunks.testSyncFailure = { _ in EIO }   // kernels whose syncfs reports nothing
            XCTAssertErrno(EIO, try volume.hub.syncJournaledObjects())
            XCTAssertEqual(try volume.api.readSlice(context, id: slice.id, offset: 0, length: 4096), data,
                           "\(compression): written again from its key")
            XCTAssertEqual(volume.hub.chunks.journaledCount, 1, "queued for the next pass")
            XCTAssertEqual(try volume.hub.meta.journaledObjects().map(\.id), [slice.id], "the key stays meanwhile")
            XCTAssertErrno(EIO, try volume.hub.syncJournaledObjects(), "a disk that keeps failing keeps the key")
            XCTAssertEqual(try volume.hub.meta.journaledObjects().map(\.id), [slice.id])
            // A rewrite that fails (the disk reserve refuses it) keeps the object out of the
            // passes: a good pass then must not drop its key.
            let reserve = volume.hub.chunks.reserveBytes
            volume.hub.chunks.setReserve(UInt64(1) << 60)
            XCTAssertErrno(EIO, try volume.hub.syncJournaledObjects())
            volume.hub.chunks.testSyncfsFailure = nil
            volume.hub.chunks.testSyncFailure = nil
            try volume.hub.syncJournaledObjects()
            XCTAssertEqual(try volume.hub.meta.journaledObjects().map(\.id), [slice.id],
                           "not written again: the key stays through a good pass")
            XCTAssertEqual(volume.hub.chunks.journaledCount, 1)
            volume.hub.chunks.setReserve(reserve)
            try volume.hub.syncJournaledObjects()
            XCTAssertEqual(volume.hub.chunks.journaledCount, 0)
            XCTAssertEqual(try volume.hub.meta.journaledObjects().count, 0, "synced: the key goes")
            XCTAssertEqual(try volume.api.status().chunks, 1, "replaced in place, counted once")
            let restarted = try reopen(volume, damaging: slice.id) { _ in }
            XCTAssertEqual(try volume.api.readSlice(restarted, id: slice.id, offset: 0, length: 4096), data)
            XCTAssertEqual(try volume.api.fsck(repair: false).problems, [])
        }
    }

    /// fsck never gives up an object whose bytes the journal still carries (a failed sync left
    /// it to be written again, or its key awaits a pass): it reports it, and --repair writes it
    /// again from its key instead of dropping the references to it. Before, --repair dropped
    /// them and deleted the object, and the file's range read as zeros while the key held its
    /// bytes.
    func testFsckWritesADamagedOrMissingObjectTheJournalCarriesAgainFromItsKey() throws {
        let (volume, context, file) = try journaledVolume()
        let data = pattern(4096, seed: 41)
        let slice = try commitDurably(data, to: file, on: volume, context)
        let other = try volume.api.create(context, parent: root, name: bytes("g"), mode: regularFile | 0o644, rdev: 0,
                                          umask: 0, exclusive: true)
        let otherData = pattern(8192, seed: 42)
        let otherSlice = try commitDurably(otherData, to: other, on: volume, context)
        let path = try XCTUnwrap(volume.chunkFile(of: slice.id))
        let damaged = try XCTUnwrap(FileManager.default.contents(atPath: path))
        try Data(damaged.map { $0 ^ 0x5A }).write(to: URL(fileURLWithPath: path))
        XCTAssertEqual(unlink(try XCTUnwrap(volume.chunkFile(of: otherSlice.id))), 0)
        XCTAssertErrno(EIO, try volume.api.readSlice(context, id: slice.id, offset: 0, length: 4096))

        let check = try volume.api.fsck(repair: false)
        XCTAssertTrue(check.problems.contains { $0.hasPrefix("chunk \(slice.id) is damaged") }, "\(check.problems)")
        XCTAssertTrue(check.problems.contains { $0 == "chunk \(otherSlice.id) is referenced but missing" }, "\(check.problems)")
        for id in [slice.id, otherSlice.id] {
            XCTAssertTrue(check.problems.contains { $0.hasPrefix("chunk \(id): the metadata journal carries its bytes") },
                          "\(check.problems)")
        }
        XCTAssertEqual(check.repaired, [])
        XCTAssertEqual(check.remaining, check.problems, "without --repair every problem remains")

        // A rewrite that fails (the disk reserve refuses it) keeps the key, and the object
        // stays out of the passes: a good pass must not drop its key.
        let reserve = volume.hub.chunks.reserveBytes
        volume.hub.chunks.setReserve(UInt64(1) << 60)
        let refused = try volume.api.fsck(repair: true)
        XCTAssertEqual(refused.repaired, [])
        for id in [slice.id, otherSlice.id] {
            XCTAssertTrue(refused.problems.contains { $0.hasPrefix("chunk \(id) could not be written again from the metadata journal") },
                          "\(refused.problems)")
        }
        XCTAssertEqual(Set(try XCTUnwrap(refused.remaining)),
                       Set(refused.problems.filter { $0.contains("could not be written again") }),
                       "the failed rewrites remain (weft fsck --repair exits 1), nothing else")
        XCTAssertEqual(refused.remaining?.count, 2)
        try volume.hub.syncJournaledObjects()       // its rewrite fails again; nothing else to sync
        XCTAssertEqual(Set(try volume.hub.meta.journaledObjects().map(\.id)), [slice.id, otherSlice.id], "the keys stay")
        XCTAssertEqual(try volume.api.layout(context, ino: file.ino, firstChunk: 0, count: 1).1.first?.map(\.id), [slice.id],
                       "the references stay")
        volume.hub.chunks.setReserve(reserve)

        let repair = try volume.api.fsck(repair: true)
        XCTAssertEqual(repair.repaired, ["wrote 2 damaged or missing chunk object(s) again from the metadata journal"])
        XCTAssertEqual(repair.remaining, [], "all repaired")
        XCTAssertEqual(try volume.api.readSlice(context, id: slice.id, offset: 0, length: 4096), data)
        XCTAssertEqual(try volume.api.readSlice(context, id: otherSlice.id, offset: 0, length: 8192), otherData)
        XCTAssertEqual(try volume.api.getattr(context, ino: file.ino).size, 4096, "the file keeps its layout")
        XCTAssertEqual(try volume.api.fsck(repair: false).problems, [])
        XCTAssertEqual(try volume.api.status().chunks, 2, "the missing object was counted once, before and after")
        try volume.hub.syncJournaledObjects()
        XCTAssertEqual(try volume.hub.meta.journaledObjects().count, 0, "queued again and synced: the keys go")
        let restarted = try reopen(volume, damaging: slice.id) { _ in }
        XCTAssertEqual(try volume.api.readSlice(restarted, id: slice.id, offset: 0, length: 4096), data)
        XCTAssertEqual(try volume.api.readSlice(restarted, id: otherSlice.id, offset: 0, length: 8192), otherData)
        XCTAssertEqual(try volume.api.status().chunks, 2, "two objects on disk, as a store opened again counts them")
        XCTAssertEqual(try volume.api.fsck(repair: false).problems, [])
    }

    /// A second durable commit naming an object that a commit under way is carrying into its
    /// journal record (an agent's retry after a barrier's timeout) is not acknowledged before
    /// that record is written: at its reply the object's bytes are in the journal. Before, it
    /// could reply while the object was neither synced nor in any written record.
    func testARetriedCommitWaitsForTheJournalRecordOfTheCommitUnderWay() throws {
        let (volume, context, file) = try journaledVolume()
        let data = pattern(4096, seed: 31)
        let slice = try writeObject(data, on: volume.api, context: context)
        let commit = [SliceCommit(chunkIndex: 0, slice: slice)]
        let entered = DispatchSemaphore(value: 0)
        let release = DispatchSemaphore(value: 0)
        volume.hub.testBeforeCommitApply = { _ in
            volume.hub.testBeforeCommitApply = nil   // the first commit only
            entered.signal()
            _ = release.wait(timeout: .now() + 30)
        }
        defer { release.signal() }
        let firstDone = DispatchSemaphore(value: 0)
        Thread.detachNewThread {
            _ = try? volume.api.commitSlices(context, ino: file.ino, slices: commit, minimumSize: 4096, durable: true)
            firstDone.signal()
        }
        XCTAssertEqual(entered.wait(timeout: .now() + 10), .success, "the first commit holds its object in the journal's hands")
        let secondDone = DispatchSemaphore(value: 0)
        let atReply = Mutex<(journaled: Bool, error: String?)?>(nil)
        Thread.detachNewThread {
            do {
                _ = try volume.api.commitSlices(context, ino: file.ino, slices: commit, minimumSize: 4096, durable: true)
                let journaled = (try? volume.hub.meta.journaledObjects().map(\.id).contains(slice.id)) ?? false
                atReply.withLock { $0 = (journaled, nil) }
            } catch {
                atReply.withLock { $0 = (false, "\(error)") }
            }
            secondDone.signal()
        }
        XCTAssertEqual(secondDone.wait(timeout: .now() + 0.5), .timedOut, "the retry waits for the first commit's record")
        release.signal()
        XCTAssertEqual(firstDone.wait(timeout: .now() + 10), .success)
        XCTAssertEqual(secondDone.wait(timeout: .now() + 10), .success)
        let reply = try XCTUnwrap(atReply.withLock { $0 })
        XCTAssertNil(reply.error)
        XCTAssertTrue(reply.journaled, "at the retry's reply the object's bytes are in a written journal record")
        XCTAssertEqual(try volume.api.readSlice(context, id: slice.id, offset: 0, length: 4096), data)
    }
}
