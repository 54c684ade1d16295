#if canImport(Glibc)
import Glibc
#endif
import WeftTestSupport
import XCTest
import WeftProto
@testable import WeftMeta

/// Slice ids, commitSlices, layout, truncate and the garbage list.
final class DataTests: MetaStoreTestCase {
    private var chunk: UInt32 { Self.chunkSizeBytes }

    private func layout(_ ino: InodeID, chunks: UInt32 = 4) throws -> [[Slice]] {
        try store.layout(ino: ino, firstChunk: 0, count: chunks).1
    }

    private func truncate(_ ino: InodeID, to size: UInt64) throws -> Attributes {
        try store.setattr(Callers.root, ino: ino, SetAttributes(size: size))
    }

    func testAllocateSliceIDsNeverOverlap() throws {
        XCTAssertErrno(EINVAL, try store.allocateSliceIDs(count: 0))
        XCTAssertErrno(EINVAL, try store.allocateSliceIDs(count: (1 << 20) + 1))
        let first = try store.allocateSliceIDs(count: 10)
        XCTAssertGreaterThan(first, 0, "0 marks a hole and is never handed out")
        let second = try store.allocateSliceIDs(count: 1)
        XCTAssertEqual(second, first + 10)
        XCTAssertEqual(store.currentCounters.nextSlice, second + 1)
        try reopen()
        XCTAssertEqual(try store.allocateSliceIDs(count: 1), second + 1, "allocations are durable")
    }

    func testSliceListRecordsAreVersionedAndOldOnesStillRead() throws {
        let home = [Slice(id: 5, offsetInChunk: 0, length: 10, objectLength: 10),
                    Slice(id: 6, offsetInChunk: 4, length: 2, sliceOffset: 1, objectLength: 9)]
        // Every slice at the home: the version 1 record (24 bytes a slice), readable by old builds.
        let version1 = encodeSlices(home)
        XCTAssertEqual(version1.count, 4 + 2 * 24)
        XCTAssertEqual(Array(version1.prefix(4)), [2, 0, 0, 0])
        XCTAssertEqual(try version1.withUnsafeBytes { try decodeSlices($0) }, home)
        // A slice held by another hub: version 2 (marker, version byte, 26 bytes a slice).
        var mixed = home
        mixed[1].hub = 3
        let version2 = encodeSlices(mixed)
        XCTAssertEqual(version2.count, 4 + 1 + 4 + 2 * 26)
        XCTAssertEqual(Array(version2.prefix(5)), [0xFF, 0xFF, 0xFF, 0xFF, 2])
        XCTAssertEqual(try version2.withUnsafeBytes { try decodeSlices($0) }, mixed)
        var unknown = version2
        unknown[4] = 3
        XCTAssertErrno(EBADMSG, try unknown.withUnsafeBytes { try decodeSlices($0) })
        // Through the store: the holder survives a commit, a reopen and a later commit.
        let file = try makeFile("held")
        var remote = try slice(0, offset: 0, length: 100)
        remote.slice.hub = 7
        _ = try store.commitSlices(ino: file.ino, slices: [remote], minimumSize: 100, durable: true)
        let local = try slice(0, offset: 50, length: 10)
        _ = try store.commitSlices(ino: file.ino, slices: [local], minimumSize: 100, durable: true)
        XCTAssertEqual(try store.layout(ino: file.ino, firstChunk: 0, count: 1).1, [[remote.slice, local.slice]])
        let check = try store.checkMetadata(repair: false)
        XCTAssertNil(check.referencedSlices[remote.slice.id], "another hub's object is not the home's to find")
        XCTAssertNotNil(check.referencedSlices[local.slice.id])
    }

    func testCommitAndLayout() throws {
        let file = try makeFile("f")
        let a = try slice(0, offset: 0, length: chunk)
        let b = try slice(1, offset: 100, length: 200)
        let c = try slice(3, offset: 0, length: 10)
        let committed = try store.commitSlices(ino: file.ino, slices: [a, b, c], minimumSize: 3 * UInt64(chunk) + 10,
                                               durable: true)
        XCTAssertEqual(committed.size, 3 * UInt64(chunk) + 10)
        XCTAssertEqual(committed.dataVersion, file.dataVersion + 1)
        XCTAssertGreaterThanOrEqual(committed.mtimeNs, file.mtimeNs)
        let (attributes, lists) = try store.layout(ino: file.ino, firstChunk: 0, count: 5)
        XCTAssertEqual(attributes, committed)
        XCTAssertEqual(lists, [[a.slice], [b.slice], [], [c.slice], []])
        XCTAssertEqual(try store.layout(ino: file.ino, firstChunk: 3, count: 1).1, [[c.slice]])
        XCTAssertEqual(try store.layout(ino: file.ino, firstChunk: 0, count: 5000).1.count, 1024, "count is bounded")
        XCTAssertEqual(store.currentCounters.logicalBytes, committed.size)
        // A commit never shrinks the file.
        let d = try slice(0, offset: 0, length: 5)
        let after = try store.commitSlices(ino: file.ino, slices: [d], minimumSize: 5, durable: false)
        XCTAssertEqual(after.size, committed.size)
        XCTAssertEqual(after.dataVersion, committed.dataVersion + 1)
        XCTAssertEqual(try layout(file.ino)[0], [a.slice, d.slice], "later slices go last")
        XCTAssertErrno(EINVAL, try store.layout(ino: root, firstChunk: 0, count: 1))
        XCTAssertErrno(ENOENT, try store.layout(ino: 4711, firstChunk: 0, count: 1))
        try assertConsistent()
    }

    func testCommitRejectsBadSlices() throws {
        let file = try makeFile("f")
        let id = try store.allocateSliceIDs(count: 1)
        let bad: [(String, Slice)] = [
            ("id 0", Slice(id: 0, offsetInChunk: 0, length: 10, objectLength: 10)),
            ("empty", Slice(id: id, offsetInChunk: 0, length: 0, objectLength: 10)),
            ("past the chunk", Slice(id: id, offsetInChunk: chunk - 5, length: 10, objectLength: 10)),
            ("past the object", Slice(id: id, offsetInChunk: 0, length: 10, sliceOffset: 5, objectLength: 10)),
        ]
        for (reason, slice) in bad {
            XCTAssertErrno(EINVAL, try store.commitSlices(ino: file.ino, slices: [SliceCommit(chunkIndex: 0, slice: slice)],
                                                          minimumSize: 10, durable: true), reason)
        }
        let good = SliceCommit(chunkIndex: 0, slice: Slice(id: id, offsetInChunk: 0, length: 10, objectLength: 10))
        XCTAssertErrno(EINVAL, try store.commitSlices(ino: root, slices: [good], minimumSize: 10, durable: true))
        XCTAssertErrno(EFBIG, try store.commitSlices(ino: file.ino, slices: [good],
                                                     minimumSize: Limits.fileSizeMaxBytes + 1, durable: true))
        XCTAssertEqual(try store.getattr(file.ino), file, "nothing changed")
        XCTAssertEqual(try layout(file.ino, chunks: 1), [[]])
    }

    func testCommitToARemovedFileIsStale() throws {
        let file = try makeFile("f")
        try store.unlink(Callers.root, parent: root, name: bytes("f"))
        let late = try slice(0, offset: 0, length: 10)
        XCTAssertErrno(ESTALE, try store.commitSlices(ino: file.ino, slices: [late], minimumSize: 10, durable: true))
        XCTAssertErrno(ENOENT, try store.getattr(file.ino))
    }

    func testSlicesCommittedToARemovedFileBecomeGarbage() throws {
        // The code says so ("The file is gone: its new slices are garbage.") and the hub relies on
        // the garbage list to delete chunk objects.
        // BUG (Sources/WeftMeta/MetaStore+Data.swift, MetaStore.commitSlices): `t.discard(...)` is
        // followed by `throw WeftError(ESTALE ...)` inside `mutate`, and `mutate` drops the whole
        // batch when its body throws, so the garbage entries are never written and the chunk
        // objects leak (until the next hub start-up sweep).
        let file = try makeFile("f")
        try store.unlink(Callers.root, parent: root, name: bytes("f"))
        let late = try slice(0, offset: 0, length: 10)
        XCTAssertErrno(ESTALE, try store.commitSlices(ino: file.ino, slices: [late], minimumSize: 10, durable: true))
        XCTAssertEqual(try store.takeGarbage(limit: 10), [late.slice.id])
    }

    func testGarbageNamesTheHubHoldingEachObjectAndPagesInIDOrder() throws {
        let file = try makeFile("f")
        let here = try slice(0, offset: 0, length: 10)
        var there = try slice(1, offset: 0, length: 10)
        there.slice.hub = 7
        _ = try store.commitSlices(ino: file.ino, slices: [here, there], minimumSize: 0, durable: true)
        try store.unlink(Callers.root, parent: root, name: bytes("f"))
        XCTAssertEqual(try store.garbage(after: 0, limit: 10),
                       [GarbageObject(id: here.slice.id, holder: 0), GarbageObject(id: there.slice.id, holder: 7)])
        XCTAssertEqual(try store.garbage(after: here.slice.id, limit: 10), [GarbageObject(id: there.slice.id, holder: 7)])
        XCTAssertEqual(try store.garbage(after: 0, limit: 1), [GarbageObject(id: here.slice.id, holder: 0)])
        try store.forgetGarbage([there.slice.id])
        XCTAssertEqual(try store.takeGarbage(limit: 10), [here.slice.id])
    }

    func testLaterSlicesShadowEarlierOnes() throws {
        let file = try makeFile("f")
        let a = try slice(0, offset: 0, length: 100)
        let b = try slice(0, offset: 50, length: 100)
        _ = try store.commitSlices(ino: file.ino, slices: [a, b], minimumSize: 150, durable: true)
        XCTAssertEqual(try layout(file.ino, chunks: 1), [[a.slice, b.slice]], "partly covered slices stay")
        let c = try slice(0, offset: 0, length: 200)
        _ = try store.commitSlices(ino: file.ino, slices: [c], minimumSize: 200, durable: true)
        XCTAssertEqual(try layout(file.ino, chunks: 1), [[c.slice]], "covered slices are dropped")
        XCTAssertEqual(Set(try store.takeGarbage(limit: 10)), [a.slice.id, b.slice.id])
        // Within one commit too, and one commit may fill several chunks.
        let d = try slice(0, offset: 10, length: 10)
        let e = try slice(0, offset: 0, length: 300)
        let f = try slice(1, offset: 0, length: 1)
        _ = try store.commitSlices(ino: file.ino, slices: [d, f, e], minimumSize: UInt64(chunk) + 1, durable: true)
        XCTAssertEqual(try layout(file.ino, chunks: 2), [[e.slice], [f.slice]])
        XCTAssertEqual(Set(try store.takeGarbage(limit: 10)), [a.slice.id, b.slice.id, c.slice.id, d.slice.id])
        try assertConsistent()
    }

    func testTruncateDownTrimsAndDropsSlicesThenUpAddsNothing() throws {
        let file = try makeFile("f")
        let whole0 = try slice(0, offset: 0, length: chunk)
        let early = try slice(1, offset: 0, length: 1000)
        let straddling = try slice(1, offset: 500, length: 2500)
        let late = try slice(1, offset: 2000, length: chunk - 2000)
        let whole2 = try slice(2, offset: 0, length: chunk)
        let size = 3 * UInt64(chunk)
        let full = try store.commitSlices(ino: file.ino, slices: [whole0, early, straddling, late, whole2],
                                          minimumSize: size, durable: true)
        XCTAssertEqual(store.currentCounters.logicalBytes, size)

        let cut = UInt64(chunk) + 1500
        let down = try truncate(file.ino, to: cut)
        XCTAssertEqual(down.size, cut)
        XCTAssertGreaterThan(down.dataVersion, full.dataVersion)
        var trimmed = straddling.slice
        trimmed.length = 1000
        XCTAssertEqual(try layout(file.ino), [[whole0.slice], [early.slice, trimmed], [], []])
        XCTAssertEqual(Set(try store.takeGarbage(limit: 10)), [late.slice.id, whole2.slice.id])
        XCTAssertEqual(store.currentCounters.logicalBytes, cut)

        let up = try truncate(file.ino, to: 5 * UInt64(chunk))
        XCTAssertEqual(up.size, 5 * UInt64(chunk))
        XCTAssertGreaterThan(up.dataVersion, down.dataVersion)
        XCTAssertEqual(try layout(file.ino, chunks: 5), [[whole0.slice], [early.slice, trimmed], [], [], []],
                       "growing adds a hole, not data")
        XCTAssertEqual(store.currentCounters.logicalBytes, 5 * UInt64(chunk))

        _ = try truncate(file.ino, to: UInt64(chunk))
        XCTAssertEqual(try layout(file.ino), [[whole0.slice], [], [], []], "a cut on a chunk boundary drops the chunk")
        XCTAssertEqual(Set(try store.takeGarbage(limit: 10)),
                       [late.slice.id, whole2.slice.id, early.slice.id, straddling.slice.id])
        _ = try truncate(file.ino, to: 0)
        XCTAssertEqual(try layout(file.ino), [[], [], [], []])
        XCTAssertEqual(try store.takeGarbage(limit: 10).count, 5)
        XCTAssertEqual(store.currentCounters.logicalBytes, 0)
        try assertConsistent()
    }

    func testTruncateInsideOneSliceKeepsItsObject() throws {
        let file = try makeFile("f")
        let one = try slice(0, offset: 100, length: 1000)
        _ = try store.commitSlices(ino: file.ino, slices: [one], minimumSize: 1100, durable: true)
        _ = try truncate(file.ino, to: 600)
        var trimmed = one.slice
        trimmed.length = 500
        XCTAssertEqual(try layout(file.ino, chunks: 1), [[trimmed]])
        XCTAssertEqual(try store.takeGarbage(limit: 10), [], "the object is still referenced")
        _ = try truncate(file.ino, to: 50)
        XCTAssertEqual(try layout(file.ino, chunks: 1), [[]])
        XCTAssertEqual(try store.takeGarbage(limit: 10), [one.slice.id])
    }

    func testGarbageIsTakenInBatchesAndForgotten() throws {
        let file = try makeFile("f")
        var commits: [SliceCommit] = []
        for index in 0..<5 { commits.append(try slice(UInt32(index), offset: 0, length: 10)) }
        _ = try store.commitSlices(ino: file.ino, slices: commits, minimumSize: 4 * UInt64(chunk) + 10, durable: true)
        try store.unlink(Callers.root, parent: root, name: bytes("f"))
        let ids = commits.map(\.slice.id)
        XCTAssertEqual(try store.takeGarbage(limit: 3), Array(ids.prefix(3)), "in id order")
        XCTAssertEqual(try store.takeGarbage(limit: 100), ids, "taking does not remove")
        try store.forgetGarbage(Array(ids.prefix(2)))
        XCTAssertEqual(try store.takeGarbage(limit: 100), Array(ids.suffix(3)))
        try reopen()
        XCTAssertEqual(try store.takeGarbage(limit: 100), Array(ids.suffix(3)), "the garbage list is durable")
        try store.forgetGarbage(ids)
        XCTAssertEqual(try store.takeGarbage(limit: 100), [])
    }

    func testReplaceSlicesSwapsAPrefixOnlyIfUnchanged() throws {
        let file = try makeFile("f")
        let a = try slice(0, offset: 0, length: 100)
        let b = try slice(0, offset: 50, length: 100)
        _ = try store.commitSlices(ino: file.ino, slices: [a, b], minimumSize: 150, durable: true)
        let compacted = try slice(0, offset: 0, length: 150)
        XCTAssertFalse(try store.replaceSlices(ino: file.ino, chunkIndex: 0, expectedPrefix: [b.slice],
                                               replacement: compacted.slice))
        let c = try slice(0, offset: 120, length: 10)
        _ = try store.commitSlices(ino: file.ino, slices: [c], minimumSize: 150, durable: true)
        XCTAssertTrue(try store.replaceSlices(ino: file.ino, chunkIndex: 0, expectedPrefix: [a.slice, b.slice],
                                              replacement: compacted.slice))
        XCTAssertEqual(try layout(file.ino, chunks: 1), [[compacted.slice, c.slice]], "later commits stay on top")
        XCTAssertEqual(Set(try store.takeGarbage(limit: 10)), [a.slice.id, b.slice.id])
        XCTAssertFalse(try store.replaceSlices(ino: 9999, chunkIndex: 0, expectedPrefix: [], replacement: compacted.slice))
    }
}
