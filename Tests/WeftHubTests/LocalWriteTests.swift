#if canImport(Glibc)
import Glibc
#endif
import Foundation
import Synchronization
import WeftChunks
import WeftTestSupport
import XCTest
import WeftHub
@testable import WeftNet
import WeftProto

/// Co-located writes (SPEC.md §4): an agent with the hub's store writes each object there under
/// a temporary name and the hub takes it over; what the hub refuses, and where a write that
/// cannot go into the store goes.
final class LocalWriteTests: FixtureTestCase {

    /// A weftd-like hub (TCP, offering its store) and a client with co-located reads and writes.
    private func coLocated(compression: Compression = .none)
        throws -> (hub: HubUnderTest, client: RemoteHub, context: RequestContext) {
        let hub = try HubUnderTest(transport: .tcp, chunkSizeBytes: 1 << 20, compression: compression, readCacheBytes: 0)
        fixtures.append(hub)
        try XCTUnwrap(hub.server).offerLocalReads(chunkDirectory: hub.hub.chunks.directory)
        let client = RemoteHub(address: .tcp(host: "127.0.0.1", port: try XCTUnwrap(hub.port)),
                               logger: testLogger("weft.hub.client.local"))
        client.localReads = true
        client.localWrites = true
        cleanups.append { client.close() }
        let context = RequestContext(session: try client.openSession(agentName: "co-located").0, credentials: rootCaller)
        return (hub, client, context)
    }

    /// `count` seeded bytes in page-aligned memory (as the agent's write buffers: O_DIRECT).
    private func alignedBytes(_ count: Int, seed: UInt64) -> UnsafeMutableRawBufferPointer {
        let buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: count, alignment: 4096)
        cleanups.append { buffer.deallocate() }
        var random = SeededRandom(seed: seed)
        let bytes = random.bytes(count)
        buffer.copyBytes(from: bytes)
        return buffer
    }

    private func read(_ api: HubAPI, _ context: RequestContext, _ id: SliceID, count: Int) throws -> [UInt8] {
        var destination = [UInt8](repeating: 0xEE, count: count)
        try destination.withUnsafeMutableBytes { try api.readSlice(context, id: id, offset: 0, into: $0) }
        return destination
    }

    /// Object `id`'s temporary file of `tag` in `hub`'s store.
    private static func temporaryPath(_ hub: HubUnderTest, _ id: SliceID, tag: UInt32) -> String {
        temporaryPath(hubDirectory: hub.directory, id, tag: tag)
    }

    private static func temporaryPath(hubDirectory: String, _ id: SliceID, tag: UInt32) -> String {
        hubDirectory + "/chunks/" + String(format: "%02llx/%016llx.%08x.tmp", id & 0xFF, id, tag)
    }

    /// Temporary files anywhere in `hub`'s store.
    private static func temporaryFiles(_ hub: HubUnderTest) -> [String] {
        let root = hub.directory + "/chunks"
        let names = FileManager.default.enumerator(atPath: root)?.allObjects as? [String] ?? []
        return names.filter { $0.hasSuffix(".tmp") }
    }

    func testACoLocatedClientWritesIntoTheStoreAndTheHubTakesItOver() throws {
        let (hub, client, context) = try coLocated()
        let data = alignedBytes(1 << 20, seed: 57)
        let id = try client.allocateSliceIDs(context, count: 1)
        try client.writeSlice(context, id: id, bytes: UnsafeRawBufferPointer(data))
        XCTAssertEqual(client.localWriteCount, 1)
        XCTAssertEqual(client.localWriteFallbacks, 0)
        XCTAssertEqual(client.payloadBytes.all, 0, "no data went over TCP")
        XCTAssertEqual(hub.hub.adoptedObjectCount, 1)
        XCTAssertEqual(Self.temporaryFiles(hub), [])
        XCTAssertTrue(hub.hub.chunks.awaitsSync(id: id), "queued for the next sync pass, as the hub's own")
        let status = try client.status()
        XCTAssertEqual(status.chunks, 1, "counted as the hub's own")
        let file = try XCTUnwrap(hub.chunkFile(of: id))
        XCTAssertEqual(UInt64(try XCTUnwrap(FileManager.default.attributesOfItem(atPath: file)[.size] as? Int)),
                       status.storedBytes)
        // Committed, read back from the store and by the hub, and still there after a restart.
        let created = try client.create(context, parent: 1, name: Array("f".utf8), mode: 0o100644, rdev: 0, umask: 0,
                                        exclusive: true)
        _ = try client.commitSlices(context, ino: created.ino,
                                    slices: [SliceCommit(chunkIndex: 0, slice: Slice(id: id, offsetInChunk: 0, length: 1 << 20,
                                                                                     objectLength: 1 << 20))],
                                    minimumSize: 0, durable: true)
        XCTAssertTrue(try read(client, context, id, count: data.count) == Array(data))
        XCTAssertTrue(try read(hub.hub, context, id, count: data.count) == Array(data))
        client.close()
        try hub.restart(syncingJournaled: false)
        let after = RequestContext(session: try hub.api.openSession(agentName: "after").0, credentials: rootCaller)
        XCTAssertTrue(try read(hub.api, after, id, count: data.count) == Array(data))
        XCTAssertEqual(try hub.api.fsck(repair: false).problems, [])
    }

    /// Two chunks uploaded at once right after connecting (a writer's write-behind) both go
    /// into the store: the second waits while the first asks the hub for it, rather than going
    /// over TCP meanwhile.
    func testWritesWhileTheStoreIsAskedForWaitForIt() throws {
        let (hub, client, context) = try coLocated()
        client.testWhileAskingForLocalStore = { usleep(300_000) }
        let ids = try client.allocateSliceIDs(context, count: 2)
        let data = [alignedBytes(1 << 20, seed: 61), alignedBytes(1 << 20, seed: 62)]
        let failures = Mutex<[String]>([])
        nonisolated(unsafe) let firstBytes = UnsafeRawBufferPointer(data[0])
        let firstEnded = DispatchSemaphore(value: 0)
        let first = Thread {
            do { try client.writeSlice(context, id: ids, bytes: firstBytes) } catch {
                failures.withLock { $0.append("\(error)") }
            }
            firstEnded.signal()
        }
        first.start()
        usleep(100_000)     // the first write is now asking for the store
        try client.writeSlice(context, id: ids + 1, bytes: UnsafeRawBufferPointer(data[1]))
        XCTAssertEqual(firstEnded.wait(timeout: .now() + 10), .success, "the first write did not end")
        XCTAssertEqual(failures.withLock { $0 }, [])
        XCTAssertEqual(client.localWriteCount, 2)
        XCTAssertEqual(client.localWriteFallbacks, 0)
        XCTAssertEqual(client.payloadBytes.all, 0, "no data went over TCP")
        XCTAssertEqual(hub.hub.adoptedObjectCount, 2)
        for (index, id) in [ids, ids + 1].enumerated() {
            XCTAssertTrue(try read(hub.hub, context, id, count: 1 << 20) == Array(data[index]))
        }
    }

    /// Objects taken over are the session's uploads: a discard deletes them, and so does the
    /// session's end for those no commit named.
    func testTakenOverObjectsNoCommitNamesGoWithADiscardOrTheSession() throws {
        let (hub, client, context) = try coLocated()
        let first = try client.allocateSliceIDs(context, count: 2)
        for id in [first, first + 1] {
            try client.writeSlice(context, id: id, bytes: UnsafeRawBufferPointer(alignedBytes(200_000, seed: id)))
        }
        XCTAssertEqual(client.localWriteCount, 2)
        XCTAssertNotNil(hub.chunkFile(of: first))
        try client.discardUploads(context, ids: [first])
        XCTAssertNil(hub.chunkFile(of: first))
        XCTAssertNotNil(hub.chunkFile(of: first + 1))
        try client.closeSession(context.session)
        XCTAssertNil(hub.chunkFile(of: first + 1))
        XCTAssertEqual(try hub.hub.status().chunks, 0)
    }

    /// A session on a zstd volume writes the compressed object (none is sent to the hub).
    func testAZstdSessionWritesCompressedObjects() throws {
        let (hub, client, context) = try coLocated(compression: .zstd)
        let data = [UInt8]((0..<(1 << 20)).map { UInt8(truncatingIfNeeded: $0 / 4096) })
        let id = try client.allocateSliceIDs(context, count: 1)
        try data.withUnsafeBytes { try client.writeSlice(context, id: id, bytes: $0) }
        XCTAssertEqual(client.localWriteCount, 1)
        XCTAssertEqual(client.compressedUploads.objects, 0)
        XCTAssertEqual(client.payloadBytes.all, 0)
        let file = try XCTUnwrap(hub.chunkFile(of: id))
        let size = try XCTUnwrap(FileManager.default.attributesOfItem(atPath: file)[.size] as? Int)
        XCTAssertLessThan(size, data.count / 8, "stored compressed")
        XCTAssertEqual(try hub.hub.readSlice(context, id: id, offset: 0, length: UInt32(data.count)), data)
        XCTAssertEqual(try read(client, context, id, count: data.count), data)
    }

    /// A write into the store that fails (here: the temporary name is taken) sends the object
    /// over TCP, leaves what it found alone, and stops co-located writes on the connection.
    func testALocalWriteThatFailsGoesOverTCP() throws {
        let (hub, client, context) = try coLocated()
        let taken = Mutex<String?>(nil)
        let directory = hub.directory
        client.testBeforeLocalWrite = { id, tag in
            let path = Self.temporaryPath(hubDirectory: directory, id, tag: tag)
            guard taken.withLock({ $0 == nil }) else { return }
            taken.withLock { $0 = path }
            _ = FileManager.default.createFile(atPath: path, contents: Data([1, 2, 3]))
        }
        let data = alignedBytes(300_000, seed: 3)
        let id = try client.allocateSliceIDs(context, count: 1)
        try client.writeSlice(context, id: id, bytes: UnsafeRawBufferPointer(data))
        XCTAssertEqual(client.localWriteCount, 0)
        XCTAssertEqual(client.localWriteFallbacks, 1)
        XCTAssertEqual(client.payloadBytes.all, data.count)
        XCTAssertEqual(FileManager.default.contents(atPath: try XCTUnwrap(taken.withLock { $0 })), Data([1, 2, 3]))
        XCTAssertTrue(try read(hub.hub, context, id, count: data.count) == Array(data))
        // The next object goes over TCP without trying the store.
        let next = try client.allocateSliceIDs(context, count: 1)
        try client.writeSlice(context, id: next, bytes: UnsafeRawBufferPointer(data))
        XCTAssertEqual(client.localWriteCount, 0)
        XCTAssertEqual(client.localWriteFallbacks, 1)
        XCTAssertEqual(client.payloadBytes.all, 2 * data.count)
        XCTAssertTrue(try read(hub.hub, context, next, count: data.count) == Array(data))
    }

    /// A hub whose disk is inside its reserve refuses the file (ENOSPC, removed); the object
    /// then goes over TCP, where the hub refuses it before anything is written, and so do the
    /// next ones for a while, also once there is room again.
    func testAFullHubDiskSendsObjectsOverTCPForAWhile() throws {
        let (hub, client, context) = try coLocated()
        let chunks = hub.hub.chunks
        chunks.setReserve(try chunks.space().freeBytes + (1 << 30))
        let data = alignedBytes(300_000, seed: 5)
        let first = try client.allocateSliceIDs(context, count: 3)
        XCTAssertErrno(ENOSPC, try client.writeSlice(context, id: first, bytes: UnsafeRawBufferPointer(data)))
        XCTAssertEqual(client.localWriteFallbacks, 1)
        XCTAssertEqual(Self.temporaryFiles(hub), [])
        XCTAssertErrno(ENOSPC, try client.writeSlice(context, id: first + 1, bytes: UnsafeRawBufferPointer(data)))
        XCTAssertEqual(client.localWriteFallbacks, 1, "not tried again at once")
        chunks.setReserve(0)
        try client.writeSlice(context, id: first + 2, bytes: UnsafeRawBufferPointer(data))
        XCTAssertEqual(client.localWriteCount, 0)
        XCTAssertEqual(client.payloadBytes.all, 3 * data.count)
        XCTAssertTrue(try read(hub.hub, context, first + 2, count: data.count) == Array(data))
        XCTAssertNil(hub.chunkFile(of: first))
        XCTAssertNil(hub.chunkFile(of: first + 1))
    }

    /// The agent's umask does not keep the hub from reading its files.
    func testAnAgentsUmaskDoesNotReachTheStoredFile() throws {
        let (hub, client, context) = try coLocated()
        let data = alignedBytes(200_000, seed: 6)
        let id = try client.allocateSliceIDs(context, count: 1)
        let previous = umask(0o077)
        defer { umask(previous) }
        try client.writeSlice(context, id: id, bytes: UnsafeRawBufferPointer(data))
        XCTAssertEqual(client.localWriteCount, 1)
        let file = try XCTUnwrap(hub.chunkFile(of: id))
        let mode = try XCTUnwrap(FileManager.default.attributesOfItem(atPath: file)[.posixPermissions] as? Int)
        XCTAssertEqual(mode, 0o644)
    }

    /// A file whose header the hub refuses (damaged between the write and the hand-over) is
    /// removed, and the object sent over TCP.
    func testAnObjectTheHubRefusesIsSentOverTCP() throws {
        let (hub, client, context) = try coLocated()
        let directory = hub.directory
        client.testBeforeAdopt = { id, tag in
            let fd = open(Self.temporaryPath(hubDirectory: directory, id, tag: tag), O_WRONLY)
            guard fd >= 0 else { return }
            _ = pwrite(fd, [UInt8](repeating: 0xFF, count: 8), 8, 0)
            close(fd)
        }
        let data = alignedBytes(300_000, seed: 4)
        let id = try client.allocateSliceIDs(context, count: 1)
        try client.writeSlice(context, id: id, bytes: UnsafeRawBufferPointer(data))
        XCTAssertEqual(client.localWriteCount, 0)
        XCTAssertEqual(client.localWriteFallbacks, 1)
        XCTAssertEqual(Self.temporaryFiles(hub), [])
        XCTAssertTrue(try read(hub.hub, context, id, count: data.count) == Array(data))
        XCTAssertEqual(hub.hub.adoptedObjectCount, 0)
        // The store is not tried again on this connection.
        let next = try client.allocateSliceIDs(context, count: 1)
        try client.writeSlice(context, id: next, bytes: UnsafeRawBufferPointer(data))
        XCTAssertEqual(client.localWriteFallbacks, 1)
        XCTAssertEqual(client.payloadBytes.all, 2 * data.count)
    }

    /// What the hub itself refuses, each time with the temporary file removed (except one that
    /// is not an agent's, and one that is not there), and what it takes.
    func testTheHubRefusesWhatItCannotTakeOver() throws {
        let fixture = try HubUnderTest(transport: .inProcess, chunkSizeBytes: 65536)
        fixtures.append(fixture)
        let hub = fixture.hub!
        let context = RequestContext(session: try hub.openSession(agentName: "agent").0, credentials: rootCaller)
        let descriptor = open(hub.chunks.directory, O_RDONLY | O_DIRECTORY | O_CLOEXEC)
        XCTAssertGreaterThanOrEqual(descriptor, 0)
        let agent = ChunkStore(readingFrom: descriptor, directory: hub.chunks.directory, logger: testLogger("weft.agent.store"))
        let id = try hub.allocateSliceIDs(context, count: 1)
        let data = [UInt8](repeating: 0x42, count: 65536)
        var tag = ChunkStore.adoptedTagBit
        func written(_ bytes: [UInt8], for object: SliceID = id) throws -> UInt32 {
            tag += 1
            try bytes.withUnsafeBytes { try agent.writeTemporary(id: object, data: $0, tag: tag, compression: .none) }
            XCTAssertTrue(FileManager.default.fileExists(atPath: Self.temporaryPath(fixture, object, tag: tag)))
            return tag
        }
        func gone(_ object: SliceID, _ tag: UInt32, line: UInt = #line) {
            XCTAssertFalse(FileManager.default.fileExists(atPath: Self.temporaryPath(fixture, object, tag: tag)), line: line)
        }
        XCTAssertErrno(EROFS, try agent.write(id: id, data: data), "the agent's store writes only temporary files")

        // Not an agent's tag: refused, and the file (the hub's own, say) left alone.
        let own = Self.temporaryPath(fixture, id, tag: 5)
        XCTAssertTrue(FileManager.default.createFile(atPath: own, contents: Data([9])))
        XCTAssertErrno(EINVAL, try hub.adoptObject(context, id: id, tag: 5))
        XCTAssertTrue(FileManager.default.fileExists(atPath: own))
        unlink(own)
        // Nothing written for that tag.
        XCTAssertErrno(ENOENT, try hub.adoptObject(context, id: id, tag: ChunkStore.adoptedTagBit | 0x7777))
        // An id never allocated.
        let stray = try written(data, for: id + 1000)
        XCTAssertErrno(EINVAL, try hub.adoptObject(context, id: id + 1000, tag: stray))
        gone(id + 1000, stray)
        // A damaged header.
        let damaged = try written(data)
        let fd = open(Self.temporaryPath(fixture, id, tag: damaged), O_WRONLY)
        XCTAssertEqual(pwrite(fd, [UInt8](repeating: 0, count: 4), 4, 0), 4)
        close(fd)
        XCTAssertErrno(EBADMSG, try hub.adoptObject(context, id: id, tag: damaged))
        gone(id, damaged)
        // Larger than the volume's chunk.
        let large = try written([UInt8](repeating: 1, count: 65537))
        XCTAssertErrno(EINVAL, try hub.adoptObject(context, id: id, tag: large))
        gone(id, large)
        // A symbolic link (to a real object file) and a FIFO: not followed, not opened for long.
        let target = fixture.directory + "/elsewhere"
        XCTAssertTrue(FileManager.default.createFile(atPath: target, contents: Data([7])))
        tag += 1
        let link = tag
        XCTAssertEqual(symlink(target, Self.temporaryPath(fixture, id, tag: link)), 0)
        XCTAssertErrno(EINVAL, try hub.adoptObject(context, id: id, tag: link))
        gone(id, link)
        XCTAssertEqual(FileManager.default.contents(atPath: target), Data([7]))
        tag += 1
        let fifo = tag
        XCTAssertEqual(mkfifo(Self.temporaryPath(fixture, id, tag: fifo), 0o600), 0)
        XCTAssertErrno(EINVAL, try hub.adoptObject(context, id: id, tag: fifo))
        gone(id, fifo)
        // A disk inside its reserve.
        let full = try written(data)
        hub.chunks.setReserve(try hub.chunks.space().freeBytes + (1 << 30))
        XCTAssertErrno(ENOSPC, try hub.adoptObject(context, id: id, tag: full))
        hub.chunks.setReserve(0)
        gone(id, full)
        XCTAssertEqual(hub.adoptedObjectCount, 0)
        XCTAssertNil(fixture.chunkFile(of: id))

        // Taken over: counted, readable, and a second file of the id is EEXIST.
        let good = try written(data)
        try hub.adoptObject(context, id: id, tag: good)
        gone(id, good)
        XCTAssertEqual(hub.adoptedObjectCount, 1)
        XCTAssertEqual(try hub.status().chunks, 1)
        XCTAssertEqual(try hub.readSlice(context, id: id, offset: 0, length: 65536), data)
        let again = try written([UInt8](repeating: 0x43, count: 65536))
        XCTAssertErrno(EEXIST, try hub.adoptObject(context, id: id, tag: again))
        gone(id, again)
        XCTAssertEqual(try hub.readSlice(context, id: id, offset: 0, length: 65536), data, "the first one stays")
        XCTAssertEqual(try hub.fsck(repair: false).problems, [])
    }

    /// A temporary file no agent handed over (the agent was killed in between) is reported by
    /// fsck once no agent is connected (or after the orphans' grace) and removed by a repair;
    /// the store's own temporary names are not an agent's.
    func testFsckReportsAndRemovesTemporaryFilesNoAgentHandedOver() throws {
        let fixture = try HubUnderTest(transport: .inProcess, chunkSizeBytes: 65536)
        fixtures.append(fixture)
        let hub = fixture.hub!
        let session = try hub.openSession(agentName: "agent").0
        let context = RequestContext(session: session, credentials: rootCaller)
        let descriptor = open(hub.chunks.directory, O_RDONLY | O_DIRECTORY | O_CLOEXEC)
        XCTAssertGreaterThanOrEqual(descriptor, 0)
        let agent = ChunkStore(readingFrom: descriptor, directory: hub.chunks.directory, logger: testLogger("weft.agent.store"))
        let id = try hub.allocateSliceIDs(context, count: 1)
        let tag = ChunkStore.adoptedTagBit | 0x1234
        try [UInt8](repeating: 7, count: 5000).withUnsafeBytes {
            try agent.writeTemporary(id: id, data: $0, tag: tag, compression: .none)
        }
        let own = Self.temporaryPath(fixture, id, tag: 0x42)
        XCTAssertTrue(FileManager.default.createFile(atPath: own, contents: Data([1])))
        defer { unlink(own) }
        XCTAssertEqual(try hub.fsck(repair: false).problems, [], "an agent is connected, and the file is new")
        try hub.closeSession(session)
        let report = try hub.fsck(repair: false)
        XCTAssertEqual(report.problems.count, 1, "\(report.problems)")
        XCTAssertTrue(report.problems.first?.contains("temporary file (tag 80001234") == true, "\(report.problems)")
        XCTAssertTrue(FileManager.default.fileExists(atPath: Self.temporaryPath(fixture, id, tag: tag)), "a check changes nothing")
        let repaired = try hub.fsck(repair: true)
        XCTAssertEqual(repaired.repaired.filter { $0.contains("temporary file(s)") }.count, 1, "\(repaired.repaired)")
        XCTAssertEqual(repaired.remaining, [])
        XCTAssertFalse(FileManager.default.fileExists(atPath: Self.temporaryPath(fixture, id, tag: tag)))
        XCTAssertTrue(FileManager.default.fileExists(atPath: own), "the store's own temporary file is not an agent's")
        XCTAssertEqual(try hub.fsck(repair: false).problems, [])
    }

    /// An agent killed between writing an object into the store and handing it over leaves a
    /// temporary file. When a session that handed objects over ends (its connection dropped
    /// with the agent), the hub sweeps agents' temporary files older than the grace once the
    /// grace has passed, without a restart or an fsck; younger files and the store's own
    /// temporary names stay.
    func testTemporaryFilesOfAnEndedCoLocatedWriterAreSwept() throws {
        let (hub, client, context) = try coLocated()
        hub.hub.agentTemporaryGraceSeconds = 1
        let id = try client.allocateSliceIDs(context, count: 3)
        try client.writeSlice(context, id: id, bytes: UnsafeRawBufferPointer(alignedBytes(8192, seed: 3)))
        XCTAssertEqual(hub.hub.adoptedObjectCount, 1, "the session handed an object over")
        let descriptor = open(hub.hub.chunks.directory, O_RDONLY | O_DIRECTORY | O_CLOEXEC)
        XCTAssertGreaterThanOrEqual(descriptor, 0)
        let agent = ChunkStore(readingFrom: descriptor, directory: hub.hub.chunks.directory, logger: testLogger("weft.agent.store"))
        let left = ChunkStore.adoptedTagBit | 0x51
        try [UInt8](repeating: 5, count: 5000).withUnsafeBytes {
            try agent.writeTemporary(id: id + 1, data: $0, tag: left, compression: .none)
        }
        let own = Self.temporaryPath(hub, id + 2, tag: 0x42)
        XCTAssertTrue(FileManager.default.createFile(atPath: own, contents: Data([1])))
        defer { unlink(own) }
        var past = [timespec(tv_sec: time(nil) - 30, tv_nsec: 0), timespec(tv_sec: time(nil) - 30, tv_nsec: 0)]
        XCTAssertEqual(utimensat(AT_FDCWD, own, &past, 0), 0)
        Thread.sleep(forTimeInterval: 1.2)
        try client.closeSession(context.session)
        // Another agent's write in flight: younger than the grace at the sweep (its time set
        // ahead, so that the test does not race the sweep).
        let young = ChunkStore.adoptedTagBit | 0x52
        try [UInt8](repeating: 6, count: 5000).withUnsafeBytes {
            try agent.writeTemporary(id: id + 2, data: $0, tag: young, compression: .none)
        }
        var ahead = [timespec(tv_sec: time(nil) + 60, tv_nsec: 0), timespec(tv_sec: time(nil) + 60, tv_nsec: 0)]
        XCTAssertEqual(utimensat(AT_FDCWD, Self.temporaryPath(hub, id + 2, tag: young), &ahead, 0), 0)
        let deadline = Date().addingTimeInterval(15)
        while FileManager.default.fileExists(atPath: Self.temporaryPath(hub, id + 1, tag: left)), Date() < deadline {
            Thread.sleep(forTimeInterval: 0.1)
        }
        XCTAssertFalse(FileManager.default.fileExists(atPath: Self.temporaryPath(hub, id + 1, tag: left)),
                       "swept once the grace passed after the session ended")
        XCTAssertTrue(FileManager.default.fileExists(atPath: Self.temporaryPath(hub, id + 2, tag: young)), "younger than the grace")
        XCTAssertTrue(FileManager.default.fileExists(atPath: own), "the store's own temporary name is not an agent's")
        // A session that never handed an object over ends: no sweep, even of a stale file.
        let stale = ChunkStore.adoptedTagBit | 0x53
        try [UInt8](repeating: 7, count: 5000).withUnsafeBytes {
            try agent.writeTemporary(id: id + 1, data: $0, tag: stale, compression: .none)
        }
        XCTAssertEqual(utimensat(AT_FDCWD, Self.temporaryPath(hub, id + 1, tag: stale), &past, 0), 0)
        let other = try hub.hub.openSession(agentName: "reader").0
        try hub.hub.closeSession(other)
        Thread.sleep(forTimeInterval: 3)
        XCTAssertTrue(FileManager.default.fileExists(atPath: Self.temporaryPath(hub, id + 1, tag: stale)),
                      "only a session that handed objects over makes a sweep")
        let problems = try hub.api.fsck(repair: false).problems
        XCTAssertEqual(problems.filter { $0.contains("temporary file") }.count, 2, "fsck still reports what no sweep took: \(problems)")
    }
}

