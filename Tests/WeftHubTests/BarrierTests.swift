#if canImport(Glibc)
import Glibc
#endif
import Foundation
import Synchronization
import WeftHub
import WeftNet
import WeftProto
import WeftTestSupport
@testable import WeftVFS
import XCTest

/// Barriers (SPEC.md §4, opcode 50): a call that timed out may still run at the hub; a barrier
/// answers only once every request the hub read before it has finished, and an agent's commit
/// after one that may still apply waits for it there.
final class BarrierTests: HubTestCase {
    private var server: HubServer?
    private var clients: [RemoteHub] = []

    override func tearDown() {
        for client in clients { client.close() }
        clients.removeAll()
        server?.shutdown()
        server = nil
        super.tearDown()
    }

    /// A hub served over TCP, and a client whose calls give up after `requestTimeoutMs`.
    private func serve(requestTimeoutMs: Int = 30_000) throws -> (Hub, RemoteHub) {
        let hub: Hub = try XCTUnwrap(makeHub().hub)
        let server = HubServer(hub: hub, logger: testLogger("weft.hub.server"), workerThreads: 8, eventLoopThreads: 1)
        let port = try server.listen(host: "127.0.0.1", port: 0)
        self.server = server
        let client = RemoteHub(address: .tcp(host: "127.0.0.1", port: port), connectTimeoutMs: 5000,
                               requestTimeoutMs: requestTimeoutMs, logger: testLogger("weft.hub.client"))
        clients.append(client)
        return (hub, client)
    }

    func testABarrierWaitsForTheAgentsEarlierCommitsOfItsInode() throws {
        let (hub, client) = try serve()
        let context = RequestContext(session: try client.openSession(agentName: "barrier").0, credentials: rootCaller)
        let file = try client.create(context, parent: InodeNumbers.root, name: bytes("f"), mode: regularFile | 0o644,
                                     rdev: 0, umask: 0, exclusive: true)
        let other = try client.create(context, parent: InodeNumbers.root, name: bytes("g"), mode: regularFile | 0o644,
                                      rdev: 0, umask: 0, exclusive: true)
        let entered = DispatchSemaphore(value: 0)
        let release = DispatchSemaphore(value: 0)
        hub.testBeforeCommitApply = { _ in
            entered.signal()
            _ = release.wait(timeout: .now() + 30)
        }
        defer {
            hub.testBeforeCommitApply = nil
            release.signal()
        }
        let commitDone = DispatchSemaphore(value: 0)
        Thread.detachNewThread {
            _ = try? client.commitSlices(context, ino: file.ino, slices: [], minimumSize: 10, durable: false)
            commitDone.signal()
        }
        XCTAssertEqual(entered.wait(timeout: .now() + 10), .success, "the commit runs at the hub")
        hub.testBeforeCommitApply = nil
        let barrierDone = DispatchSemaphore(value: 0)
        let passed = Mutex(false)
        Thread.detachNewThread {
            do {
                try client.barrier(context, ino: file.ino)
                passed.withLock { $0 = true }
            } catch {}
            barrierDone.signal()
        }
        XCTAssertEqual(barrierDone.wait(timeout: .now() + 0.5), .timedOut, "the barrier waits for the commit read before it")
        // Requests read after the barrier do not wait for it, nor it for them; a barrier for
        // another inode, or of another session, has nothing to wait for.
        XCTAssertEqual(try client.getattr(context, ino: file.ino).size, 0)
        try client.barrier(context, ino: other.ino)
        let stranger = RequestContext(session: try client.openSession(agentName: "other").0, credentials: rootCaller)
        try client.barrier(stranger, ino: file.ino)
        // A session of the same agent (what a reconnect opens: a new id, the same name) waits.
        let again = RequestContext(session: try client.openSession(agentName: "barrier").0, credentials: rootCaller)
        let againDone = DispatchSemaphore(value: 0)
        Thread.detachNewThread {
            try? client.barrier(again, ino: file.ino)
            againDone.signal()
        }
        XCTAssertEqual(againDone.wait(timeout: .now() + 0.3), .timedOut, "the same agent's new session waits too")
        XCTAssertEqual(barrierDone.wait(timeout: .now()), .timedOut, "still waiting")
        release.signal()
        XCTAssertEqual(barrierDone.wait(timeout: .now() + 10), .success)
        XCTAssertEqual(againDone.wait(timeout: .now() + 10), .success)
        XCTAssertTrue(passed.withLock { $0 })
        XCTAssertEqual(commitDone.wait(timeout: .now() + 10), .success)
        XCTAssertEqual(try client.getattr(context, ino: file.ino).size, 10)
        try client.barrier(context, ino: file.ino)   // nothing earlier runs: at once
    }

    /// A sync whose answer never arrived may have carried a loss report (a data hub answers
    /// ESTALE once, SPEC.md §3.2): every staged upload from before it is written again.
    func testStagedUploadsAreWrittenAgainAfterASyncWhoseAnswerWasLost() throws {
        let (hub, client) = try serve(requestTimeoutMs: 1500)
        var options = VFSOptions()
        options.agentName = "lost-sync"
        let agent = try VFS(hub: client, options: options, logger: testLogger("weft.vfs.test"))
        defer { try? agent.shutdown() }
        let chunk = Int(try client.openSession(agentName: "probe").1.chunkSizeBytes)
        let (attributes, handle) = try agent.create(rootCaller, parent: InodeNumbers.root, name: bytes("staged"),
                                                   mode: regularFile | 0o644, umask: 0, flags: O_RDWR)
        var random = SeededRandom(seed: 7)
        let data = random.bytes(2 * chunk)
        _ = try data.withUnsafeBytes { try agent.write(handle: handle, offset: 0, data: $0) }
        let file = try XCTUnwrap(agent.files[attributes.ino])
        let before: Set<SliceID> = file.lock.withLock {
            file.waitForUploads()
            return Set(file.staged.flatMap { $0.uploaded ?? [] }.map(\.slice.id))
        }
        XCTAssertEqual(before.count, 2, "two chunks staged, uploaded, not committed")
        let (_, other) = try agent.create(rootCaller, parent: InodeNumbers.root, name: bytes("clean"),
                                          mode: regularFile | 0o644, umask: 0, flags: O_RDWR)
        let release = DispatchSemaphore(value: 0)
        hub.testBeforeSync = {
            hub.testBeforeSync = nil   // this sync only
            _ = release.wait(timeout: .now() + 10)
        }
        defer { release.signal() }
        // An fsync with nothing buffered is a sync alone; its answer comes too late.
        XCTAssertThrowsError(try agent.fsync(handle: other)) { XCTAssertEqual(($0 as? WeftError)?.errno, ETIMEDOUT) }
        release.signal()
        try agent.fsync(handle: handle)
        let session = RequestContext(session: try client.openSession(agentName: "check").0, credentials: rootCaller)
        let named = try client.layout(session, ino: attributes.ino, firstChunk: 0, count: 2).1.flatMap { $0.map(\.id) }
        XCTAssertEqual(named.count, 2)
        XCTAssertTrue(Set(named).isDisjoint(with: before), "the file names objects uploaded before the lost answer")
        try agent.release(handle: handle)
        try agent.release(handle: other)
        let reader = try VFS(hub: hub, options: VFSOptions(), logger: testLogger("weft.vfs.test"))
        defer { try? reader.shutdown() }
        let (check, _) = try reader.open(rootCaller, ino: attributes.ino, flags: O_RDONLY)
        XCTAssertTrue(try reader.read(handle: check, offset: 0, size: 2 * chunk).bytes() == data)
    }

    /// An fsync whose commit timed out while the hub still held it; the application writes the
    /// same range again and fsyncs: that commit must land after the first, or the first would
    /// lay its older bytes over the newer ones.
    func testACommitAfterATimedOutCommitWaitsForItAtTheHub() throws {
        let (hub, client) = try serve(requestTimeoutMs: 3000)
        var options = VFSOptions()
        options.agentName = "barrier-vfs"
        let agent = try VFS(hub: client, options: options, logger: testLogger("weft.vfs.test"))
        defer { try? agent.shutdown() }
        let (attributes, handle) = try agent.create(rootCaller, parent: InodeNumbers.root, name: bytes("f"),
                                                   mode: regularFile | 0o644, umask: 0, flags: O_RDWR)
        let old = [UInt8](repeating: 1, count: 1000)
        let new = [UInt8](repeating: 2, count: 1000)
        _ = try old.withUnsafeBytes { try agent.write(handle: handle, offset: 0, data: $0) }
        let held = DispatchSemaphore(value: 0)
        let release = DispatchSemaphore(value: 0)
        hub.testBeforeCommitApply = { _ in
            hub.testBeforeCommitApply = nil   // the first commit only
            held.signal()
            _ = release.wait(timeout: .now() + 30)
        }
        defer { release.signal() }
        XCTAssertThrowsError(try agent.fsync(handle: handle)) { XCTAssertEqual(($0 as? WeftError)?.errno, ETIMEDOUT) }
        XCTAssertEqual(held.wait(timeout: .now() + 10), .success)
        _ = try new.withUnsafeBytes { try agent.write(handle: handle, offset: 0, data: $0) }
        let fsynced = DispatchSemaphore(value: 0)
        let failure = Mutex<Int32>(0)
        Thread.detachNewThread {
            do { try agent.fsync(handle: handle) } catch { failure.withLock { $0 = (error as? WeftError)?.errno ?? -1 } }
            fsynced.signal()
        }
        XCTAssertEqual(fsynced.wait(timeout: .now() + 0.3), .timedOut, "the second commit waits for the first at the hub")
        release.signal()
        XCTAssertEqual(fsynced.wait(timeout: .now() + 10), .success)
        XCTAssertEqual(failure.withLock { $0 }, 0)
        try agent.release(handle: handle)
        // What another agent reads: the newer bytes.
        let reader = try VFS(hub: hub, options: VFSOptions(), logger: testLogger("weft.vfs.test"))
        defer { try? reader.shutdown() }
        let (check, _) = try reader.open(rootCaller, ino: attributes.ino, flags: O_RDONLY)
        let read = try reader.read(handle: check, offset: 0, size: 1000).bytes()
        XCTAssertTrue(read == new, "the file holds the first commit's bytes (\(read.first ?? 0)), laid over the second's")
    }
}
