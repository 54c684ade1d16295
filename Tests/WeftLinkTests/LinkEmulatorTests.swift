import Foundation
import Logging
import NIOCore
import NIOPosix
import WeftLink
import WeftTestSupport
import XCTest

/// Echoes every byte back.
private final class EchoHandler: ChannelInboundHandler {
    typealias InboundIn = ByteBuffer
    typealias OutboundOut = ByteBuffer

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        context.writeAndFlush(data, promise: nil)
    }
}

/// A blocking TCP client with a receive timeout.
private final class Client {
    let fd: Int32

    init(port: Int, timeoutMs: Int = 5000) throws {
        fd = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
        var address = sockaddr_in()
        address.sin_family = sa_family_t(AF_INET)
        address.sin_port = in_port_t(UInt16(port).bigEndian)
        address.sin_addr.s_addr = inet_addr("127.0.0.1")
        let result = withUnsafePointer(to: &address) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { connect(fd, $0, socklen_t(MemoryLayout<sockaddr_in>.size)) }
        }
        guard result == 0 else { throw WeftTestFailure("connect: \(String(cString: strerror(errno)))") }
        setTimeout(ms: timeoutMs)
    }

    func setTimeout(ms: Int) {
        var timeout = timeval(tv_sec: ms / 1000, tv_usec: Int((ms % 1000) * 1000))
        setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &timeout, socklen_t(MemoryLayout<timeval>.size))
    }

    func send(_ bytes: [UInt8]) {
        var done = 0
        while done < bytes.count {
            let n = bytes.withUnsafeBytes { Glibc.send(fd, $0.baseAddress! + done, bytes.count - done, Int32(MSG_NOSIGNAL)) }
            if n <= 0 { return }
            done += n
        }
    }

    /// Reads until `count` bytes, end of stream or the timeout.
    func receive(_ count: Int) -> [UInt8] {
        var out = [UInt8](repeating: 0, count: count)
        var done = 0
        while done < count {
            let n = out.withUnsafeMutableBytes { recv(fd, $0.baseAddress! + done, count - done, 0) }
            if n <= 0 { break }
            done += n
        }
        return Array(out[0..<done])
    }

    deinit { close(fd) }
}

struct WeftTestFailure: Error, CustomStringConvertible {
    var description: String
    init(_ description: String) { self.description = description }
}

final class LinkEmulatorTests: XCTestCase {
    private var group: MultiThreadedEventLoopGroup!
    private var echo: Channel!
    private var link: LinkEmulator!
    private var linkPort = 0

    override func setUpWithError() throws {
        group = MultiThreadedEventLoopGroup(numberOfThreads: 1)
        echo = try ServerBootstrap(group: group)
            .childChannelInitializer { $0.pipeline.addHandler(EchoHandler()) }
            .bind(host: "127.0.0.1", port: 0).wait()
    }

    override func tearDownWithError() throws {
        link?.shutdown()
        try echo?.close().wait()
        try group?.syncShutdownGracefully()
    }

    private func startLink(_ settings: LinkSettings = LinkSettings()) throws {
        link = LinkEmulator(target: "127.0.0.1", port: echo.localAddress!.port!, settings: settings, logger: testLogger("link"))
        linkPort = try link.listen(host: "127.0.0.1", port: 0)
    }

    func testBytesArriveIntactInOrderAndAreCounted() throws {
        try startLink()
        var random = SeededRandom(seed: 1)
        let payload = (0..<(4 << 20)).map { _ in UInt8(truncatingIfNeeded: random.next()) }
        let client = try Client(port: linkPort)
        let sender = Thread { client.send(payload) }
        sender.start()
        let echoed = client.receive(payload.count)
        XCTAssertEqual(echoed.count, payload.count)
        XCTAssertTrue(echoed == payload, "bytes changed or reordered on the way")
        let stats = link.currentStats
        XCTAssertEqual(stats.bytesForward, UInt64(payload.count))
        XCTAssertEqual(stats.bytesBackward, UInt64(payload.count))
        XCTAssertEqual(stats.accepted, 1)
        XCTAssertFalse(stats.cut)
    }

    /// Each direction adds the one-way delay: an echo takes at least twice it.
    func testDelayIsAddedInEachDirection() throws {
        try startLink(LinkSettings(delayMs: 60))
        let client = try Client(port: linkPort)
        client.send([1])
        XCTAssertEqual(client.receive(1), [1])  // connection set up
        let start = DispatchTime.now().uptimeNanoseconds
        client.send([2, 3])
        XCTAssertEqual(client.receive(2), [2, 3])
        let elapsedMs = Double(DispatchTime.now().uptimeNanoseconds - start) / 1e6
        XCTAssertGreaterThanOrEqual(elapsedMs, 120, "round trip through a 60 ms one-way link")
    }

    /// The cap paces delivery: 1 MiB at 8 Mbit/s (1 MB/s) each way cannot echo in under ~1 s.
    func testRateCapPacesDelivery() throws {
        try startLink(LinkSettings(delayMs: 0, rateBytesPerSecond: 1_000_000))
        let client = try Client(port: linkPort)
        let payload = [UInt8](repeating: 7, count: 1 << 20)
        let start = DispatchTime.now().uptimeNanoseconds
        let sender = Thread { client.send(payload) }
        sender.start()
        XCTAssertEqual(client.receive(payload.count).count, payload.count)
        let elapsed = Double(DispatchTime.now().uptimeNanoseconds - start) / 1e9
        XCTAssertGreaterThanOrEqual(elapsed, 0.95, "1 MiB through a 1 MB/s link")
    }

    /// A cut link forwards nothing and closes nothing; heal delivers what was held, in order.
    func testCutHoldsTrafficAndHealResumesIt() throws {
        try startLink()
        let client = try Client(port: linkPort, timeoutMs: 400)
        client.send([1, 2, 3])
        XCTAssertEqual(client.receive(3), [1, 2, 3])
        link.cut()
        XCTAssertTrue(link.currentStats.cut)
        let before = link.currentStats
        client.send([4, 5, 6])
        XCTAssertEqual(client.receive(3), [], "a cut link delivered bytes")
        XCTAssertEqual(link.currentStats.bytesForward, before.bytesForward)

        // A connection opened during the cut is accepted but joined only at heal.
        let late = try Client(port: linkPort, timeoutMs: 400)
        late.send([9])
        XCTAssertEqual(late.receive(1), [])

        link.heal()
        client.setTimeout(ms: 5000)
        late.setTimeout(ms: 5000)
        XCTAssertEqual(client.receive(3), [4, 5, 6])
        XCTAssertEqual(late.receive(1), [9])
        XCTAssertEqual(link.currentStats.connections, 2)
    }

    func testResetClosesRelayedConnections() throws {
        try startLink()
        let client = try Client(port: linkPort)
        client.send([1])
        XCTAssertEqual(client.receive(1), [1])
        link.resetConnections()
        XCTAssertEqual(client.receive(1), [], "the connection should end")
    }

    /// A link whose target refuses connections closes the accepted connection.
    func testUnreachableTargetClosesTheClient() throws {
        let closedPort: Int = try {
            let channel = try ServerBootstrap(group: group).bind(host: "127.0.0.1", port: 0).wait()
            let port = channel.localAddress!.port!
            try channel.close().wait()
            return port
        }()
        link = LinkEmulator(target: "127.0.0.1", port: closedPort, settings: LinkSettings(), logger: testLogger("link"))
        linkPort = try link.listen(host: "127.0.0.1", port: 0)
        let client = try Client(port: linkPort)
        client.send([1])
        XCTAssertEqual(client.receive(1), [])
    }

    func testControlCommands() throws {
        try startLink(LinkSettings(delayMs: 5))
        XCTAssertEqual(LinkCommand.execute("delay 20", on: link), "ok")
        XCTAssertEqual(link.currentSettings.delayMs, 20)
        XCTAssertEqual(LinkCommand.execute("rate 8", on: link), "ok")
        XCTAssertEqual(link.currentSettings.rateBytesPerSecond, 1_000_000)
        XCTAssertEqual(LinkCommand.execute("rate 0", on: link), "ok")
        XCTAssertNil(link.currentSettings.rateBytesPerSecond)
        XCTAssertEqual(LinkCommand.execute("cut", on: link), "ok")
        XCTAssertTrue(link.currentStats.cut)
        XCTAssertEqual(LinkCommand.execute("heal", on: link), "ok")
        let stats = LinkCommand.execute("stats", on: link)
        let decoded = try JSONSerialization.jsonObject(with: Data(stats.utf8)) as? [String: Any]
        XCTAssertEqual(decoded?["cut"] as? Bool, false)
        XCTAssertNotNil(decoded?["bytesForward"] as? Int)
        for bad in ["", "delay", "delay -1", "delay 99999999", "rate x", "explode"] {
            XCTAssertTrue(LinkCommand.execute(bad, on: link).hasPrefix("error"), "'\(bad)' accepted")
        }
        XCTAssertEqual(link.currentSettings.delayMs, 20, "a rejected command changed the settings")
    }
}
