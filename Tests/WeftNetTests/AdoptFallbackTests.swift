#if canImport(Glibc)
import Glibc
#endif
import Foundation
import WeftTestSupport
import XCTest
import WeftProto
@testable import WeftNet

/// Co-located writes against a hub that does not take objects over.
final class AdoptFallbackTests: XCTestCase {
    private let logger = testLogger("weft.net.adopt")

    private func startServer(_ hub: FakeHub) throws -> (HubServer, Int) {
        let server = HubServer(hub: hub, logger: logger, workerThreads: 2, eventLoopThreads: 1)
        return (server, try server.listen(host: "127.0.0.1", port: 0))
    }

    private func context(_ session: SessionID) -> RequestContext {
        RequestContext(session: session, credentials: Credentials(uid: 0, gid: 0, groups: []))
    }

    /// A hub that offers its store but does not take objects over (ENOSYS for `adoptObject`,
    /// SPEC.md §4 Co-located writes) gets them over TCP, the file written into the store
    /// removed, and is not asked again on that connection.
    func testAHubThatDoesNotTakeOverObjectsGetsThemOverTCP() throws {
        let hub = FakeHub()
        let (server, port) = try startServer(hub)
        defer { server.shutdown() }
        let directory = NSTemporaryDirectory() + "weft-adopt-\(getpid())-\(UInt64.random(in: 0...UInt64.max))"
        defer { try? FileManager.default.removeItem(atPath: directory) }
        let id: SliceID = 1 << 33 + 1
        try FileManager.default.createDirectory(atPath: directory + String(format: "/%02llx", id & 0xFF),
                                                withIntermediateDirectories: true)
        try server.offerLocalReads(chunkDirectory: directory)
        let client = RemoteHub(address: .tcp(host: "127.0.0.1", port: port), logger: logger)
        defer { client.close() }
        client.localReads = true
        client.localWrites = true
        let c = context(try client.openSession(agentName: "co-located").0)
        XCTAssertEqual(try client.allocateSliceIDs(c, count: 1), id)
        let data = [UInt8](repeating: 0x61, count: 100_000)
        for _ in 0..<2 {
            try data.withUnsafeBytes { try client.writeSlice(c, id: id, bytes: $0) }
        }
        XCTAssertEqual(hub.slices[id], data)
        XCTAssertEqual(client.localWriteCount, 0)
        XCTAssertEqual(client.localWriteFallbacks, 1, "tried once on the connection")
        let left = try FileManager.default.subpathsOfDirectory(atPath: directory).filter { $0.hasSuffix(".tmp") }
        XCTAssertEqual(left, [])
    }
}
