import Foundation
import Logging
import XCTest
import WeftProto
import WeftNet

/// Loopback throughput of the transport alone (FakeHub behind it). Opt-in, since timings on a
/// shared machine mean little: `WEFT_NET_BENCH=1 swift test -c release --filter ThroughputTests`.
final class ThroughputTests: XCTestCase {
    func testLoopbackThroughput() throws {
        try XCTSkipUnless(ProcessInfo.processInfo.environment["WEFT_NET_BENCH"] != nil, "set WEFT_NET_BENCH=1 to run")
        var logger = Logger(label: "weft.net.bench")
        logger.logLevel = .critical
        let hub = FakeHub()
        let server = HubServer(hub: hub, logger: logger, workerThreads: 8, eventLoopThreads: 2)
        let port = try server.listen(host: "127.0.0.1", port: 0)
        defer { server.shutdown() }
        let client = RemoteHub(address: .tcp(host: "127.0.0.1", port: port), logger: logger)
        defer { client.close() }
        let context = RequestContext(session: 0, credentials: .root)
        let sliceBytes = 4 << 20
        let data = [UInt8](repeating: 7, count: sliceBytes)
        try client.writeSlice(context, id: 1, data: data)

        let rounds = 40
        var start = Date()
        for _ in 0..<rounds { _ = try client.readSlice(context, id: 1, offset: 0, length: UInt32(sliceBytes)) }
        print("readSlice 4 MiB, 1 thread: \(Double(rounds * 4) / Date().timeIntervalSince(start)) MiB/s")
        start = Date()
        for _ in 0..<rounds { try client.writeSlice(context, id: 2, data: data) }
        print("writeSlice 4 MiB, 1 thread: \(Double(rounds * 4) / Date().timeIntervalSince(start)) MiB/s")
        start = Date()
        DispatchQueue.concurrentPerform(iterations: 4) { _ in
            for _ in 0..<rounds / 4 { _ = try? client.readSlice(context, id: 1, offset: 0, length: UInt32(sliceBytes)) }
        }
        print("readSlice 4 MiB, 4 threads: \(Double(rounds * 4) / Date().timeIntervalSince(start)) MiB/s")
        let calls = 5000
        start = Date()
        for index in 0..<calls { _ = try client.getattr(context, ino: InodeID(index)) }
        print("getattr, 1 thread: \(Double(calls) / Date().timeIntervalSince(start)) calls/s")
        start = Date()
        DispatchQueue.concurrentPerform(iterations: 8) { _ in
            for index in 0..<calls / 8 { _ = try? client.getattr(context, ino: InodeID(index)) }
        }
        print("getattr, 8 threads: \(Double(calls) / Date().timeIntervalSince(start)) calls/s")
    }
}
