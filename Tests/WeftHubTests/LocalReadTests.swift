#if canImport(Glibc)
import Glibc
#endif
import CWeftSupport
import Foundation
import WeftLink
import WeftTestSupport
import XCTest
import WeftHub
@testable import WeftNet
import WeftProto

/// Every `HubConformanceTests` test again over TCP with co-located reads on: reads come from
/// the hub's store through the descriptor it handed over, everything else over TCP (SPEC.md §4,
/// Co-located reads).
final class LocalReadHubConformanceTests: HubConformanceTests {
    override class var transport: HubTransport { .tcpLocalReads }

    /// The suite above does read from the store (and XCTest on Linux finds a subclass's
    /// inherited tests only when it declares one of its own).
    func testReadsOfThisSuiteComeFromTheStore() throws {
        let remote = try XCTUnwrap(api as? RemoteHub)
        XCTAssertTrue(remote.localReads)
        let data = [UInt8](repeating: 0x5A, count: 60_000)
        let slice = try writeObject(data)
        var destination = [UInt8](repeating: 0, count: data.count)
        try destination.withUnsafeMutableBytes { try api.readSlice(context, id: slice.id, offset: 0, into: $0) }
        XCTAssertEqual(destination, data)
        XCTAssertEqual(remote.localReadCount, 1)
        XCTAssertEqual(remote.storedBlockReadCount, 0)
        XCTAssertEqual(remote.localWriteCount, 1, "and its writes go into the store")
        XCTAssertEqual(remote.payloadBytes.all, 0)
    }
}

/// What only co-located reads have: the handshake, who gets the store and who does not, and
/// where a read that the store cannot serve goes.
final class LocalReadTests: FixtureTestCase {

    /// A hub with one 1 MiB object of seeded bytes, and a second client with co-located reads
    /// on; `offer` false: the server offers none.
    private func hubWithObject(offer: Bool = true) throws
        -> (hub: HubUnderTest, server: HubServer, client: RemoteHub, context: RequestContext, data: [UInt8], id: SliceID) {
        let hub = try HubUnderTest(transport: .tcp, chunkSizeBytes: 1 << 20, compression: .none, readCacheBytes: 0)
        fixtures.append(hub)
        let server = try XCTUnwrap(hub.server)
        if offer { try server.offerLocalReads(chunkDirectory: hub.hub.chunks.directory) }
        let client = RemoteHub(address: .tcp(host: "127.0.0.1", port: try XCTUnwrap(hub.port)),
                               logger: testLogger("weft.hub.client.local"))
        client.localReads = true
        cleanups.append { client.close() }
        let context = RequestContext(session: try client.openSession(agentName: "co-located").0, credentials: rootCaller)
        var random = SeededRandom(seed: 7_070)
        let data = random.bytes(1 << 20)
        let id = try client.allocateSliceIDs(context, count: 1)
        try data.withUnsafeBytes { try client.writeSlice(context, id: id, bytes: $0) }
        return (hub, server, client, context, data, id)
    }

    /// The socket's 8-byte reply as received (fewer bytes if it ended early) and the
    /// descriptor it carried (-1: none).
    private static func receiveReply(_ peer: Int32) -> (reply: [UInt8], descriptor: Int32) {
        var reply = [UInt8](repeating: 0, count: 8)
        var descriptor: Int32 = -1
        let got = reply.withUnsafeMutableBytes { weft_receive_with_descriptor(peer, $0.baseAddress, $0.count, &descriptor) }
        return (Array(reply[0..<max(0, got)]), descriptor)
    }

    private func read(_ client: RemoteHub, _ context: RequestContext, _ id: SliceID, offset: Int = 0, count: Int) throws -> [UInt8] {
        var destination = [UInt8](repeating: 0xEE, count: count)
        try destination.withUnsafeMutableBytes { try client.readSlice(context, id: id, offset: UInt32(offset), into: $0) }
        return destination
    }

    func testACoLocatedClientReadsFromTheStoreAndSendsEverythingElseOverTCP() throws {
        let (_, server, client, context, data, id) = try hubWithObject()
        for round in 0..<3 {
            XCTAssertTrue(try read(client, context, id, count: data.count) == data, "round \(round)")
        }
        XCTAssertTrue(try read(client, context, id, offset: 70_000, count: 5_000) == Array(data[70_000..<75_000]))
        XCTAssertEqual(client.localReadCount, 4)
        XCTAssertEqual(client.localReadFallbacks, 0)
        XCTAssertEqual(client.storedBlockReadCount, 0, "no read went over TCP")
        XCTAssertEqual(server.localReadHandshakes, 1, "one descriptor for the connection")
        XCTAssertEqual(try client.status().chunks, 1, "other calls still go to the hub")
    }

    func testAHubThatOffersNothingIsReadOverTCP() throws {
        let (_, server, client, context, data, id) = try hubWithObject(offer: false)
        XCTAssertTrue(try read(client, context, id, count: data.count) == data)
        XCTAssertTrue(try read(client, context, id, count: data.count) == data)
        XCTAssertEqual(client.localReadCount, 0)
        XCTAssertEqual(client.storedBlockReadCount, 2)
        XCTAssertEqual(server.localReadHandshakes, 0)
    }

    /// A relay between client and hub (here `weft-link`'s, as the WAN tests use) makes the hub
    /// see the relay's address, not the client's: the client stays on TCP, so an emulated
    /// link stays in the path.
    func testAConnectionThroughARelayIsReadOverTCP() throws {
        let (hub, server, _, _, data, id) = try hubWithObject()
        let relay = LinkEmulator(target: "127.0.0.1", port: try XCTUnwrap(hub.port), settings: LinkSettings(),
                                 logger: testLogger("weft.link.local"))
        cleanups.append { relay.shutdown() }
        let relayPort = try relay.listen(host: "127.0.0.1", port: 0)
        let relayed = RemoteHub(address: .tcp(host: "127.0.0.1", port: relayPort), logger: testLogger("weft.hub.client.relayed"))
        relayed.localReads = true
        relayed.localWrites = true
        cleanups.append { relayed.close() }
        let context = RequestContext(session: try relayed.openSession(agentName: "relayed").0, credentials: rootCaller)
        XCTAssertTrue(try read(relayed, context, id, count: data.count) == data)
        XCTAssertEqual(relayed.localReadCount, 0)
        XCTAssertEqual(relayed.storedBlockReadCount, 1)
        // Writes too go over the relay: no store to write into.
        let written = try relayed.allocateSliceIDs(context, count: 1)
        try data.withUnsafeBytes { try relayed.writeSlice(context, id: written, bytes: $0) }
        XCTAssertEqual(relayed.localWriteCount + relayed.localWriteFallbacks, 0)
        XCTAssertEqual(relayed.payloadBytes.all, data.count)
        XCTAssertTrue(try read(relayed, context, written, count: data.count) == data)
        XCTAssertEqual(server.localReadHandshakes, 0, "no descriptor went through the relay's connection")
    }

    /// An object the store does not hold (here: its file removed behind the hub's back while
    /// the hub still has it open) is asked of the hub, which answers from what it has.
    func testAnObjectMissingFromTheStoreIsAskedOfTheHub() throws {
        let (hub, _, client, context, data, id) = try hubWithObject()
        XCTAssertEqual(try hub.hub.readSlice(context, id: id, offset: 0, length: 16), Array(data[0..<16]),
                       "the hub opens (and keeps open) the object")
        let path = try XCTUnwrap(hub.chunkFile(of: id))
        XCTAssertEqual(unlink(path), 0)
        XCTAssertTrue(try read(client, context, id, count: data.count) == data, "from the hub's open object")
        XCTAssertEqual(client.localReadCount, 0)
        XCTAssertEqual(client.localReadFallbacks, 1)
        XCTAssertEqual(client.storedBlockReadCount, 1)
    }

    /// A damaged block is read once more through the hub's own check: EIO, never wrong bytes,
    /// and the hub's log names the chunk as without co-located reads.
    func testADamagedBlockIsEIOAndTheHubChecksItToo() throws {
        let (hub, _, client, context, data, id) = try hubWithObject()
        let path = try XCTUnwrap(hub.chunkFile(of: id))
        var file = [UInt8](try Data(contentsOf: URL(fileURLWithPath: path)))
        let blockTwo = try XCTUnwrap(HubConformanceTests.payloadOffset(ofBlock: 2, in: file))
        file[blockTwo + 17] ^= 0x01
        try Data(file).write(to: URL(fileURLWithPath: path))
        XCTAssertErrno(EIO, try read(client, context, id, count: data.count))
        XCTAssertEqual(client.localReadFallbacks, 1)
        XCTAssertTrue(try read(client, context, id, count: 2 * Limits.blockSizeBytes)
                          == Array(data[0..<(2 * Limits.blockSizeBytes)]), "the blocks before it still read")
        XCTAssertEqual(client.localReadCount, 1)
    }

    /// The socket answers only its own request, with an errno and no descriptor otherwise.
    func testTheSocketRefusesAnythingButItsRequest() throws {
        let (_, server, _, _, _, _) = try hubWithObject(offer: false)
        let name = try server.offerLocalReads(chunkDirectory: NSTemporaryDirectory())
        XCTAssertErrno(EALREADY, try server.offerLocalReads(chunkDirectory: NSTemporaryDirectory()), "offered once")
        func exchange(_ request: [UInt8]) throws -> (reply: [UInt8], descriptor: Int32) {
            let socket = weft_connect_abstract(name, 3_000)
            XCTAssertGreaterThanOrEqual(socket, 0, String(cString: strerror(errno)))
            defer { close(socket) }
            _ = request.withUnsafeBytes { weft_send_with_descriptor(socket, $0.baseAddress, $0.count, -1) }
            return Self.receiveReply(socket)
        }
        let refused = try exchange(Array("WEFTLR02".utf8))
        XCTAssertEqual(refused.reply, Array("WEFTLR".utf8) + [UInt8(EPROTO), 0])
        XCTAssertEqual(refused.descriptor, -1)
        let granted = try exchange(Array("WEFTLR01".utf8))
        XCTAssertEqual(granted.reply, Array("WEFTLR".utf8) + [0, 0])
        XCTAssertGreaterThanOrEqual(granted.descriptor, 0)
        var status = stat()
        XCTAssertEqual(fstat(granted.descriptor, &status), 0)
        XCTAssertEqual(status.st_mode & S_IFMT, S_IFDIR, "the store's directory")
        close(granted.descriptor)
        XCTAssertEqual(server.localReadHandshakes, 1)
    }

    /// A file weftd deletes (garbage collection, fsck --repair) is not read from the
    /// descriptor the client's store still holds: ENOENT, as from the hub.
    func testAnObjectTheHubDeletesIsNotReadFromAnOpenDescriptor() throws {
        let (hub, _, client, context, data, id) = try hubWithObject()
        XCTAssertTrue(try read(client, context, id, count: data.count) == data)
        try hub.hub.chunks.delete(id: id)
        XCTAssertErrno(ENOENT, try read(client, context, id, count: data.count))
        XCTAssertEqual(client.localReadCount, 1)
        XCTAssertEqual(client.localReadFallbacks, 1, "tried the store, then asked the hub")
    }

    /// A peer that connects and sends nothing holds the socket's one thread for at most its
    /// bound (then ETIMEDOUT); the next client's handshake still succeeds.
    func testAStalledPeerDoesNotStopTheNextHandshake() throws {
        let (_, server, client, context, data, id) = try hubWithObject()
        let name = try XCTUnwrap(server.localReadsOffer?.name)
        let stalled = weft_connect_abstract(name, 5_000)
        XCTAssertGreaterThanOrEqual(stalled, 0)
        defer { close(stalled) }
        XCTAssertTrue(try read(client, context, id, count: data.count) == data)
        XCTAssertEqual(client.localReadCount, 1, "the handshake after the stalled peer's succeeded")
        let answer = Self.receiveReply(stalled)
        XCTAssertEqual(answer.reply, Array("WEFTLR".utf8) + [UInt8(ETIMEDOUT), 0])
        XCTAssertEqual(answer.descriptor, -1)
    }

    /// The client takes the store only from a hub on its own kernel, and only the directory
    /// the hub named.
    func testTheClientChecksTheMachineAndTheDirectory() throws {
        let (_, server, _, _, _, _) = try hubWithObject()
        let offered = try XCTUnwrap(server.localReadsOffer).offer(peer: "127.0.0.1:1")
        let logger = testLogger("weft.hub.client.checks")
        var elsewhere = offered
        elsewhere.bootID = "00000000-0000-0000-0000-000000000000"
        XCTAssertThrowsError(try LocalReadClient.openStore(elsewhere, localEndpoint: "127.0.0.1:1", logger: logger)) {
            XCTAssertTrue("\($0)".contains("another machine"), "\($0)")
        }
        var otherDirectory = offered
        otherDirectory.inode &+= 1
        XCTAssertThrowsError(try LocalReadClient.openStore(otherDirectory, localEndpoint: "127.0.0.1:1", logger: logger)) {
            XCTAssertTrue("\($0)".contains("another directory"), "\($0)")
        }
        XCTAssertThrowsError(try LocalReadClient.openStore(offered, localEndpoint: "127.0.0.1:2", logger: logger)) {
            XCTAssertTrue("\($0)".contains("relays"), "\($0)")
        }
        XCTAssertNoThrow(try LocalReadClient.openStore(offered, localEndpoint: "127.0.0.1:1", logger: logger))
        XCTAssertEqual(server.localReadHandshakes, 2, "the directory check came after a handshake; the others before")
        XCTAssertEqual(try LocalReadClient.Offer.decode(offered.encoded()), offered)
        XCTAssertErrno(EBADMSG, try LocalReadClient.Offer.decode(offered.encoded() + [0]))
    }

    /// The peer's second is a total, not a bound per byte: one that drips its request gets
    /// ETIMEDOUT.
    func testAPeerThatDripsItsRequestTimesOut() throws {
        let (_, server, _, _, _, _) = try hubWithObject()
        let name = try XCTUnwrap(server.localReadsOffer?.name)
        let peer = weft_connect_abstract(name, 5_000)
        XCTAssertGreaterThanOrEqual(peer, 0)
        defer { close(peer) }
        for byte in Array("WEFT".utf8) {
            _ = withUnsafeBytes(of: byte) { weft_send_with_descriptor(peer, $0.baseAddress, 1, -1) }
            usleep(400_000)
        }
        let answer = Self.receiveReply(peer)
        XCTAssertEqual(answer.reply, Array("WEFTLR".utf8) + [UInt8(ETIMEDOUT), 0])
        XCTAssertEqual(answer.descriptor, -1)
        XCTAssertEqual(server.localReadHandshakes, 0)
    }

    /// A lost connection drops the store; the connection after it asks the hub again (here a
    /// new server on the same port, as a restarted weftd is, with another socket).
    func testALostConnectionDropsTheStoreAndTheNextOneAsksAgain() throws {
        let (hub, server, client, context, data, _) = try hubWithObject()
        // An object of a session in the hub's own process: the client's sessions end with its
        // connection, and their uploads that no file references with them.
        let owner = RequestContext(session: try hub.hub.openSession(agentName: "in-process").0, credentials: rootCaller)
        let id = try hub.hub.allocateSliceIDs(owner, count: 1)
        try data.withUnsafeBytes { try hub.hub.writeSlice(owner, id: id, bytes: $0) }
        XCTAssertTrue(try read(client, context, id, count: data.count) == data)
        XCTAssertEqual(server.localReadHandshakes, 1)
        let port = try XCTUnwrap(hub.port)
        server.shutdown()
        let again = HubServer(hub: hub.hub, logger: testLogger("weft.hub.server.again"), workerThreads: 4, eventLoopThreads: 1)
        cleanups.append { again.shutdown() }
        try again.offerLocalReads(chunkDirectory: hub.hub.chunks.directory)
        XCTAssertEqual(try again.listen(host: "127.0.0.1", port: port), port)
        var failure: Error?
        XCTAssertTrue(eventually {
            do { return try self.read(client, context, id, count: data.count) == data } catch { failure = error; return false }
        }, "the client reconnects and reads: \(String(describing: failure))")
        // The read that reconnects goes over TCP (no connection to ask on before it); the next asks.
        XCTAssertTrue(try read(client, context, id, count: data.count) == data)
        XCTAssertEqual(again.localReadHandshakes, 1, "the new connection asked the new server")
        XCTAssertGreaterThanOrEqual(client.localReadCount, 2)
    }
}
