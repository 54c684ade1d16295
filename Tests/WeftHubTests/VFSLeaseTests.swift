#if canImport(Glibc)
import Glibc
#endif
import Foundation
import WeftTestSupport
import XCTest
import WeftHub
import WeftProto
@testable import WeftVFS

/// Coherence between agents through leases (SPEC.md §12.6), in process and over TCP (the
/// `VFSDataTests` fixture runs on both transports).
extension VFSDataTests {
    func testAReturnedWriteIsReadByAnotherAgentBeforeTheWriterCloses() throws {
        let writer = try makeAgent(), reader = try makeAgent()
        let (ino, handle) = try create(writer, "unclosed")
        try write(writer, handle, at: 0, Array("hello".utf8))
        // The writer holds the write lease and buffers; the reader's getattr and read recall it.
        XCTAssertEqual(try reader.getattr(rootCaller, ino: ino).size, 5)
        XCTAssertEqual(try contents(of: ino, via: reader), Array("hello".utf8))
        // Now the writer writes through (it lost the lease): each write is visible at once.
        try write(writer, handle, at: 5, Array(" world".utf8))
        XCTAssertEqual(try contents(of: ino, via: reader), Array("hello world".utf8))
        try writer.release(handle: handle)
    }

    func testAnOpenHandleDoesNotReadStaleBytesAfterAnotherAgentsCommit() throws {
        let first = try makeAgent(), second = try makeAgent()
        let (ino, handle) = try create(first, "shared")
        var random = SeededRandom(seed: 41)
        let data = random.bytes(3 * Self.chunk)
        try write(first, handle, at: 0, data)
        try first.release(handle: handle)
        let (readHandle, _) = try first.open(rootCaller, ino: ino, flags: O_RDONLY)
        XCTAssertEqual(try read(first, readHandle, at: 0, data.count), data)   // layouts now cached
        let (writeHandle, _) = try second.open(rootCaller, ino: ino, flags: O_RDWR)
        try write(second, writeHandle, at: Self.chunk + 10, [9, 9, 9])
        try second.flush(handle: writeHandle)
        var expected = data
        expected.replaceSubrange(Self.chunk + 10..<Self.chunk + 13, with: [9, 9, 9])
        XCTAssertEqual(try read(first, readHandle, at: 0, data.count), expected, "the recall dropped the cached layout")
        try second.release(handle: writeHandle)
        try first.release(handle: readHandle)
    }

    func testAFileOpenedUnderALeaseStaysReadableWhenAnotherAgentUnlinksIt() throws {
        let holder = try makeAgent(), remover = try makeAgent()
        let (ino, handle) = try create(holder, "doomed")
        try write(holder, handle, at: 0, Array("still here".utf8))
        try holder.release(handle: handle)
        XCTAssertEqual(try contents(of: ino, via: holder), Array("still here".utf8))
        let inodesBefore = fixture.hub.meta.currentCounters.inodes
        // Under the lease this open makes no call to the home...
        let (local, _) = try holder.open(rootCaller, ino: ino, flags: O_RDONLY)
        XCTAssertTrue(holder.openFile(ino)?.leaseLock.withLock { !holder.openFile(ino)!.localHandles.isEmpty } ?? false,
                      "a read-only open under a lease stays local")
        // ...so the unlink's recall registers it there first, and the file outlives its name.
        try remover.unlink(rootCaller, parent: root, name: Array("doomed".utf8))
        XCTAssertEqual(try read(holder, local, at: 0, 100), Array("still here".utf8))
        XCTAssertEqual(fixture.hub.meta.currentCounters.inodes, inodesBefore, "kept while open")
        try holder.release(handle: local)
        XCTAssertTrue(eventually { self.fixture.hub.meta.currentCounters.inodes == inodesBefore - 1 },
                      "reclaimed at the last close")
    }

    func testTwoWritersWriteThroughAndSeeEachOther() throws {
        let a = try makeAgent(), b = try makeAgent()
        let (ino, created) = try create(a, "contended")
        try a.release(handle: created)
        let (ha, _) = try a.open(rootCaller, ino: ino, flags: O_RDWR)
        let (hb, _) = try b.open(rootCaller, ino: ino, flags: O_RDWR)
        for round in 0..<8 {
            let (writer, handle, other, otherHandle) = round % 2 == 0 ? (a, ha, b, hb) : (b, hb, a, ha)
            try write(writer, handle, at: round, [UInt8(round + 1)])
            XCTAssertEqual(try read(other, otherHandle, at: round, 1), [UInt8(round + 1)], "round \(round)")
        }
        try a.release(handle: ha)
        try b.release(handle: hb)
        XCTAssertEqual(try contents(of: ino, via: a), (1...8).map(UInt8.init))
    }
}
