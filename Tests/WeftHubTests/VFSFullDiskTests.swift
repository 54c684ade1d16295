#if canImport(Glibc)
import Glibc
#endif
import Foundation
import WeftTestSupport
import XCTest
import WeftChunks
import WeftHub
import WeftProto
@testable import WeftVFS

/// What the agent does when the hub's disk is full (SPEC.md §9.1), in process and over TCP. The
/// hub's space reserve stands in for the disk: set to more than is free, every new object is
/// refused with ENOSPC, as on a full disk; set back to 0, the space is back.
extension VFSDataTests {
    func fillDisk(_ hub: HubUnderTest, leaving roomBytes: UInt64 = 0) throws {
        let chunks = hub.hub.chunks
        let free = try chunks.space().freeBytes
        chunks.setReserve(roomBytes == 0 ? free + (1 << 30) : free - roomBytes)
    }

    func freeDisk(_ hub: HubUnderTest) { hub.hub.chunks.setReserve(0) }

    func testACommitThatFailsPartWayDiscardsTheObjectsItWrote() throws {
        let hub = try makeHub(chunkSizeBytes: 1 << 20)
        let agent = try makeAgent(on: hub)
        let (ino, handle) = try create(agent, "three-chunks")
        let piece = [UInt8](repeating: 7, count: 768 << 10)
        for index in 0..<3 { try write(agent, handle, at: index << 20, piece) }   // one extent per chunk
        try fillDisk(hub, leaving: 1_100 << 10)   // room for the first object, not the second
        defer { freeDisk(hub) }
        XCTAssertErrno(ENOSPC, try agent.fsync(handle: handle))
        XCTAssertEqual(try hub.api.status().chunks, 0, "the object the failed attempt wrote was discarded")
        freeDisk(hub)
        try agent.fsync(handle: handle)
        try agent.release(handle: handle)
        XCTAssertEqual(try hub.api.status().chunks, 3)
        let reader = try makeAgent(on: hub)
        let (readHandle, _) = try reader.open(rootCaller, ino: ino, flags: O_RDONLY)
        XCTAssertEqual(try read(reader, readHandle, at: 2 << 20, piece.count), piece)
        try reader.release(handle: readHandle)
    }

    func testOnAFullDiskFsyncIsENOSPCAndTheDataLandsWhenSpaceIsBack() throws {
        let agent = try makeAgent()
        let (ino, handle) = try create(agent, "waits")
        let data = (0..<(3 * Self.chunk + 100)).map { UInt8(truncatingIfNeeded: $0 &* 7) }
        try fillDisk(fixture)
        defer { freeDisk(fixture) }
        try write(agent, handle, at: 0, data)
        XCTAssertErrno(ENOSPC, try agent.fsync(handle: handle))
        XCTAssertEqual(try fixture.api.status().chunks, 0, "no object left by the failed attempts")
        XCTAssertGreaterThan(agent.budget.used, 0, "the writes are kept")
        freeDisk(fixture)
        try agent.fsync(handle: handle)
        XCTAssertEqual(agent.budget.used, 0)
        try agent.release(handle: handle)
        XCTAssertEqual(try contents(of: ino, via: try makeAgent()), data)
    }

    func testAFileUnlinkedWhileItsWritesWaitForSpaceIsDroppedAndForgotten() throws {
        let agent = try makeAgent()
        let (_, handle) = try create(agent, "doomed")
        try fillDisk(fixture)
        defer { freeDisk(fixture) }
        try write(agent, handle, at: 0, [UInt8](repeating: 1, count: 2 * Self.chunk))
        XCTAssertErrno(ENOSPC, try agent.release(handle: handle))   // close: the commit fails, the writes wait
        XCTAssertGreaterThan(agent.budget.used, 0)
        try agent.unlink(rootCaller, parent: root, name: bytes("doomed"))
        agent.closes.drain()   // the file is gone once the home has the close (SPEC.md §7, Closes)
        // The next attempt (the background commit's) finds the file gone: nothing can ever be
        // committed, so the writes are dropped, while the disk is still full.
        XCTAssertErrno(ESTALE, try agent.flushAll(durable: false))
        XCTAssertEqual(agent.budget.used, 0, "the buffered writes were dropped")
        XCTAssertNoThrow(try agent.flushAll(durable: false), "and are not tried again")
        XCTAssertEqual(try fixture.api.status().chunks, 0)
    }

    func testBackgroundCommitsBackOffAfterFailures() throws {
        XCTAssertEqual((0...8).map { VFS.commitRetryDelayMs(failures: $0) },
                       [0, 1000, 2000, 4000, 8000, 16000, 30000, 30000, 30000])
        XCTAssertEqual(VFS.commitRetryDelayMs(failures: 1000), 30000)
        var options = VFSOptions()
        options.agentName = "back-off"
        options.commitIntervalMs = 0   // the background commit takes any dirty file at once
        let agent = try VFS(hub: fixture.api, options: options, logger: testLogger("weft.vfs.test"))
        defer { try? agent.shutdown() }
        let (_, handle) = try create(agent, "retried")
        defer { try? agent.release(handle: handle) }
        try fillDisk(fixture)
        defer { freeDisk(fixture) }
        try write(agent, handle, at: 0, [9, 9, 9])
        let before = Leases.nowNs()
        XCTAssertErrno(ENOSPC, try agent.fsync(handle: handle))
        XCTAssertErrno(ENOSPC, try agent.fsync(handle: handle))
        let file = try XCTUnwrap(agent.openFile(try agent.fileHandle(handle).file.ino))
        XCTAssertEqual(file.commitFailures, 2)
        XCTAssertGreaterThanOrEqual(file.nextCommitAttemptNs, before + 2_000_000_000, "the next background try waits 2 s")
        // The background commit skips the file until then (it would fail a third time).
        agent.commitStaleBuffers()
        XCTAssertEqual(file.lock.withLock { file.commitFailures }, 2)
        freeDisk(fixture)
        try agent.fsync(handle: handle)
        XCTAssertEqual(file.commitFailures, 0)
        XCTAssertEqual(file.nextCommitAttemptNs, 0)
    }
}

/// A write() that is committed before it returns (no write lease) and fails has no effect.
extension VFSDataTests {
    func testAWrittenThroughWriteThatCannotCommitFailsWithNoEffect() throws {
        let a = try makeAgent(), b = try makeAgent()
        let (ino, handleA) = try create(a, "shared")
        let (handleB, _) = try b.open(rootCaller, ino: ino, flags: O_RDWR)   // two writers: both write through
        try write(a, handleA, at: 0, [1, 1, 1, 1])
        try fillDisk(fixture)
        defer { freeDisk(fixture) }
        let nines: [UInt8] = [9, 9]
        XCTAssertErrno(ENOSPC, try nines.withUnsafeBytes { try a.write(handle: handleA, offset: 1, data: $0) })
        XCTAssertEqual(a.budget.used, 0, "the failed write's bytes were dropped")
        freeDisk(fixture)
        try write(a, handleA, at: 3, [1])
        try a.release(handle: handleA)
        try b.release(handle: handleB)
        XCTAssertEqual(try contents(of: ino, via: b), [1, 1, 1, 1])
    }
}
