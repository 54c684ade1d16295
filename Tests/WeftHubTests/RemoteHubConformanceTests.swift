#if canImport(Glibc)
import Glibc
#endif
import Foundation
import WeftTestSupport
import XCTest
import WeftHub
import WeftNet
import WeftProto

/// Every `HubConformanceTests` test again, through `RemoteHub` → TCP 127.0.0.1 → `HubServer` →
/// `Hub`, plus what only a network transport has: connections that end and hubs that do not answer.
final class RemoteHubConformanceTests: HubConformanceTests {
    override class var transport: HubTransport { .tcp }

    func testEndOfConnectionClosesItsSessions() throws {
        let port = try XCTUnwrap(fixture.port)
        let client = RemoteHub(address: .tcp(host: "127.0.0.1", port: port), logger: testLogger("weft.hub.client2"))
        defer { client.close() }
        let (session, _) = try client.openSession(agentName: "departing")
        let departing = RequestContext(session: session, credentials: rootCaller)
        let file = try client.create(departing, parent: root, name: bytes("f"), mode: regularFile | 0o644, rdev: 0,
                                     umask: 0, exclusive: true)
        _ = try client.open(departing, ino: file.ino, flags: O_RDWR)
        try client.unlink(departing, parent: root, name: bytes("f"))
        XCTAssertEqual(try api.status().agents.sorted(), ["conformance", "departing"])
        XCTAssertEqual(try api.getattr(context, ino: file.ino).nlink, 0)
        client.close()
        XCTAssertTrue(try eventually { try api.status().agents == ["conformance"] }, "the server closed the session")
        XCTAssertTrue(eventually { (try? api.getattr(context, ino: file.ino)) == nil },
                      "and released its unlinked open file")
        XCTAssertErrno(ESHUTDOWN, try client.status(), "a closed client refuses calls")
    }

    func testObjectsWrittenOverTheNetworkGoDirectToDisk() throws {
        // SPEC.md §4, Bulk transfers: the server copies received data into page-aligned memory,
        // so the store's O_DIRECT path applies as it does for an embedded hub.
        let hub = try makeHub(chunkSizeBytes: 1 << 20, compression: .none)
        let context = RequestContext(session: try hub.api.openSession(agentName: "direct").0, credentials: rootCaller)
        let before = hub.hub.chunks.directIOCounters
        let data = (0..<(1 << 20)).map { UInt8(truncatingIfNeeded: $0 &* 5) }
        let id = try hub.api.allocateSliceIDs(context, count: 1)
        try data.withUnsafeBytes { try hub.api.writeSlice(context, id: id, bytes: $0) }
        let after = hub.hub.chunks.directIOCounters
        // Unless the test directory's file system refused O_DIRECT (then the store turned it off).
        if after.enabled { XCTAssertEqual(after.writes, before.writes + 1) }
        XCTAssertEqual(try hub.api.readSlice(context, id: id, offset: 0, length: UInt32(data.count)), data)
    }

    func testObjectsReadOverTheNetworkStayInThePageCacheOrTheHubsReadCache() throws {
        // SPEC.md §3.2, Direct I/O: weftd keeps reads in the page cache, so agents reading the
        // same objects share it; the in-process hub (embedded) reads around it. SPEC.md §4, Hub
        // read cache: weftd with a read cache reads a span around the page cache into the cache,
        // once, however many readers.
        for (transport, cacheBytes) in [(HubTransport.tcp, 0), (.tcp, 64 << 20), (.inProcess, 0)] {
            let hub = try HubUnderTest(transport: transport, chunkSizeBytes: 1 << 20, compression: .none, recover: true,
                                       readCacheBytes: cacheBytes)
            defer { hub.shutdown() }
            let context = RequestContext(session: try hub.api.openSession(agentName: "reads").0, credentials: rootCaller)
            let data = (0..<(1 << 20)).map { UInt8(truncatingIfNeeded: $0 &* 7) }
            let id = try hub.api.allocateSliceIDs(context, count: 1)
            try data.withUnsafeBytes { try hub.api.writeSlice(context, id: id, bytes: $0) }
            let before = hub.hub.chunks.directIOCounters
            for _ in 0..<2 {
                let destination = UnsafeMutableRawBufferPointer.allocate(byteCount: data.count, alignment: 4096)
                defer { destination.deallocate() }
                try hub.api.readSlice(context, id: id, offset: 0, into: destination)
                XCTAssertEqual(Array(destination), data)
            }
            let after = hub.hub.chunks.directIOCounters
            guard after.enabled else { continue }   // the test directory's file system refused O_DIRECT
            let label = "\(transport), read cache \(cacheBytes)"
            if transport == .tcp && cacheBytes == 0 {
                XCTAssertEqual(after.reads, before.reads, "\(label): weftd read around its page cache")
                XCTAssertNil(hub.hub.chunks.spanCacheCounters)
            } else if transport == .tcp {
                XCTAssertEqual(after.reads, before.reads + 1, "\(label): one direct read into the read cache")
                let counters = try XCTUnwrap(hub.hub.chunks.spanCacheCounters)
                XCTAssertEqual(counters.misses, 1, label)
                XCTAssertEqual(counters.hits, 1, label)
                XCTAssertEqual(try XCTUnwrap(hub.server).storedBlockBytes.sentFromMemory, 2 * data.count, label)
            } else {
                XCTAssertEqual(after.reads, before.reads + 2, "\(label): the in-process hub read around the page cache")
            }
        }
    }

    /// SPEC.md §4, Stored-block reads: the hub sends stored blocks from the object's file; what a
    /// full socket does not take is read into a buffer and queued, and the bytes arrive the same.
    /// A hub of 1 MiB chunks holding one object of 1 MiB of seeded bytes, and a session on it.
    private func hubWithOneObject(seed: UInt64, agentName: String, readCacheBytes: Int = 0) throws
        -> (hub: HubUnderTest, context: RequestContext, data: [UInt8], id: SliceID) {
        let hub = try HubUnderTest(transport: Self.transport, chunkSizeBytes: 1 << 20, compression: .none,
                                   readCacheBytes: readCacheBytes)
        fixtures.append(hub)
        let context = RequestContext(session: try hub.api.openSession(agentName: agentName).0, credentials: rootCaller)
        var random = SeededRandom(seed: seed)
        let data = random.bytes(1 << 20)
        let id = try hub.api.allocateSliceIDs(context, count: 1)
        try data.withUnsafeBytes { try hub.api.writeSlice(context, id: id, bytes: $0) }
        return (hub, context, data, id)
    }

    func testStoredBlocksGoFromTheFileOrThroughTheQueueWhenTheSocketIsFull() throws {
        let (hub, context, data, id) = try hubWithOneObject(seed: 5150, agentName: "spans")
        let (server, client) = try readThroughASmallSocket(hub, id: id, data: data, rounds: 3)
        defer { client.close(); server.shutdown() }
        XCTAssertEqual(client.storedBlockReadCount, 3)
        let (sentFromFile, copied, sentFromMemory) = server.storedBlockBytes
        XCTAssertEqual(sentFromMemory, 0, "no read cache")
        XCTAssertGreaterThan(copied, 0, "a full socket sends the rest through the queue")
        XCTAssertEqual(sentFromFile + copied, 3 * data.count)
        // The default server sends from the file (its socket drains while it waits).
        let fixtureBefore = try XCTUnwrap(hub.server).storedBlockBytes.sentFromFile
        var destination = [UInt8](repeating: 0, count: data.count)
        try destination.withUnsafeMutableBytes { try hub.api.readSlice(context, id: id, offset: 0, into: $0) }
        XCTAssertTrue(destination == data)
        XCTAssertGreaterThan(try XCTUnwrap(hub.server).storedBlockBytes.sentFromFile, fixtureBefore)
    }

    /// SPEC.md §4, Hub read cache: spans from weftd's read cache go from its memory while the
    /// socket takes them; a socket that stays full gets the rest copied and queued, and the
    /// bytes arrive the same.
    func testSpansFromTheReadCacheGoFromMemoryOrThroughTheQueueWhenTheSocketIsFull() throws {
        let (hub, _, data, id) = try hubWithOneObject(seed: 5151, agentName: "cached", readCacheBytes: 64 << 20)
        let (server, client) = try readThroughASmallSocket(hub, id: id, data: data, rounds: 3)
        defer { client.close(); server.shutdown() }
        try XCTSkipUnless(hub.hub.chunks.directIOCounters.enabled, "the test directory's file system refuses O_DIRECT")
        let (sentFromFile, copied, sentFromMemory) = server.storedBlockBytes
        XCTAssertEqual(sentFromFile, 0, "every span came from the read cache")
        XCTAssertGreaterThan(copied, 0, "a full socket sends the rest through the queue")
        XCTAssertEqual(sentFromMemory + copied, 3 * data.count)
        XCTAssertEqual(hub.hub.chunks.spanCacheCounters?.misses, 1, "one read for the three")
    }

    /// Reads object `id` `rounds` times through a second server on `hub` whose sockets hold
    /// 64 KiB and which never waits for them, checking the bytes each time.
    private func readThroughASmallSocket(_ hub: HubUnderTest, id: SliceID, data: [UInt8], rounds: Int) throws
        -> (HubServer, RemoteHub) {
        let server = HubServer(hub: hub.hub, logger: testLogger("weft.hub.server.small"), workerThreads: 4,
                               eventLoopThreads: 1, spanWaitMs: 0, sendBufferBytes: 64 << 10)
        let client: RemoteHub
        do {
            let port = try server.listen(host: "127.0.0.1", port: 0)
            client = RemoteHub(address: .tcp(host: "127.0.0.1", port: port), logger: testLogger("weft.hub.client.small"))
        } catch {
            server.shutdown()
            throw error
        }
        do {
            let session = RequestContext(session: try client.openSession(agentName: "small-buffers").0, credentials: rootCaller)
            for round in 0..<rounds {
                var destination = [UInt8](repeating: 0, count: data.count)
                try destination.withUnsafeMutableBytes { try client.readSlice(session, id: id, offset: 0, into: $0) }
                XCTAssertTrue(destination == data, "round \(round): the bytes arrive intact")
            }
        } catch {
            client.close()
            server.shutdown()
            throw error
        }
        return (server, client)
    }

    /// writeSlice data goes from the caller's memory to the socket; a socket that stays full
    /// (64 KiB of send buffer, no wait) gets the rest copied and queued, and the hub gets every
    /// byte either way.
    func testWriteSliceDataGoesFromCallerMemoryOrThroughTheQueueWhenTheSocketIsFull() throws {
        let hub = try makeHub(chunkSizeBytes: 1 << 20, compression: .none)
        let port = try XCTUnwrap(hub.port)
        let client = RemoteHub(address: .tcp(host: "127.0.0.1", port: port), payloadWaitMs: 0, sendBufferBytes: 64 << 10,
                               logger: testLogger("weft.hub.client.payload"))
        defer { client.close() }
        let context = RequestContext(session: try client.openSession(agentName: "small-buffer").0, credentials: rootCaller)
        var random = SeededRandom(seed: 7270)
        var written: [(SliceID, [UInt8])] = []
        for _ in 0..<3 {
            let data = random.bytes(1 << 20)
            let id = try client.allocateSliceIDs(context, count: 1)
            try data.withUnsafeBytes { try client.writeSlice(context, id: id, bytes: $0) }
            written.append((id, data))
        }
        for (id, data) in written {
            XCTAssertTrue(try hub.hub.readSlice(context, id: id, offset: 0, length: UInt32(data.count)) == data,
                          "object \(id) arrived intact")
        }
        let (all, sentFromMemory) = client.payloadBytes
        XCTAssertEqual(all, 3 << 20)
        XCTAssertLessThan(sentFromMemory, all, "a full socket sends the rest through the queue")
        // The default client sends from memory (its socket drains while it waits).
        let remote = try XCTUnwrap(hub.api as? RemoteHub)
        let before = remote.payloadBytes
        let data = random.bytes(1 << 20)
        let id = try hub.api.allocateSliceIDs(self.context, count: 1)
        try data.withUnsafeBytes { try remote.writeSlice(self.context, id: id, bytes: $0) }
        XCTAssertEqual(remote.payloadBytes.all - before.all, data.count)
        XCTAssertGreaterThan(remote.payloadBytes.sentFromMemory, before.sentFromMemory)
        XCTAssertTrue(try hub.hub.readSlice(context, id: id, offset: 0, length: UInt32(data.count)) == data)
    }

    /// A stored-block read whose file ends early at the hub (the file changed under the open
    /// object) cannot change the frame it started: the rest comes as zeros with the errno in the
    /// trailer, the reader gets EIO naming the chunk, and the connection goes on.
    func testAFileThatEndsEarlyWhileItIsSentIsEIOAndTheConnectionGoesOn() throws {
        let (hub, context, data, id) = try hubWithOneObject(seed: 6160, agentName: "short")
        var destination = [UInt8](repeating: 0, count: data.count)
        try destination.withUnsafeMutableBytes { try hub.api.readSlice(context, id: id, offset: 0, into: $0) }
        XCTAssertTrue(destination == data, "the object is open at the hub, its header checked")
        let path = try XCTUnwrap(hub.chunkFile(of: id))
        XCTAssertEqual(truncate(path, off_t(300_000)), 0)
        XCTAssertThrowsError(try destination.withUnsafeMutableBytes {
            try hub.api.readSlice(context, id: id, offset: 0, into: $0)
        }) { error in
            XCTAssertEqual((error as? WeftError)?.errno, EIO, "\(error)")
            XCTAssertTrue("\(error)".contains("hub could not read chunk"), "\(error)")
        }
        XCTAssertEqual(try hub.api.statfs(context).nameMaxBytes, 255, "the same connection still answers")
    }

    func testHubThatRefusesConnectionsFailsFast() throws {
        // A port nothing listens on: bind one, then close it.
        let probe = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
        var address = sockaddr_in()
        address.sin_family = sa_family_t(AF_INET)
        address.sin_addr.s_addr = inet_addr("127.0.0.1")
        address.sin_port = 0
        var length = socklen_t(MemoryLayout<sockaddr_in>.size)
        _ = withUnsafeMutablePointer(to: &address) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { bind(probe, $0, length) }
        }
        _ = withUnsafeMutablePointer(to: &address) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { getsockname(probe, $0, &length) }
        }
        let port = Int(UInt16(bigEndian: address.sin_port))
        close(probe)
        let client = RemoteHub(address: .tcp(host: "127.0.0.1", port: port), connectTimeoutMs: 1000,
                               requestTimeoutMs: 1000, logger: testLogger("weft.hub.client3"))
        defer { client.close() }
        let started = Date()
        XCTAssertErrno(EIO, try client.openSession(agentName: "nobody"))
        XCTAssertLessThan(Date().timeIntervalSince(started), 5, "a bounded wait")
    }

    func testHubThatNeverAnswersTimesOut() throws {
        // A listener whose connections are accepted by the kernel but never read.
        let listener = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
        defer { close(listener) }
        var address = sockaddr_in()
        address.sin_family = sa_family_t(AF_INET)
        address.sin_addr.s_addr = inet_addr("127.0.0.1")
        address.sin_port = 0
        var length = socklen_t(MemoryLayout<sockaddr_in>.size)
        _ = withUnsafeMutablePointer(to: &address) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { bind(listener, $0, length) }
        }
        XCTAssertEqual(listen(listener, 8), 0)
        _ = withUnsafeMutablePointer(to: &address) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { getsockname(listener, $0, &length) }
        }
        let port = Int(UInt16(bigEndian: address.sin_port))
        let client = RemoteHub(address: .tcp(host: "127.0.0.1", port: port), connectTimeoutMs: 1000,
                               requestTimeoutMs: 700, logger: testLogger("weft.hub.client4"))
        defer { client.close() }
        let started = Date()
        XCTAssertThrowsError(try client.openSession(agentName: "patient")) { error in
            let code = (error as? WeftError)?.errno
            XCTAssertTrue(code == ETIMEDOUT || code == EIO, "\(error)")
        }
        XCTAssertLessThan(Date().timeIntervalSince(started), 5, "never a hang")
    }
}
