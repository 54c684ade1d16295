#if canImport(Glibc)
import Glibc
#endif
import Foundation
import Logging
import NIOCore
import NIOPosix
import WeftTestSupport
import XCTest
import WeftProto
@testable import WeftNet

/// Frames written from the producing thread (SPEC.md §4, Direct sends): order, integrity and
/// non-blocking under a reader that does not keep up, on real sockets.
final class DirectSendTests: XCTestCase {
    private var logger: Logger {
        var logger = Logger(label: "weft.net.test")
        logger.logLevel = ProcessInfo.processInfo.environment["WEFT_TEST_LOG"] != nil ? .trace : .critical
        return logger
    }

    /// A stream socket pair: one end as an NIO channel with a `DirectSender`, the other raw.
    private func senderPair(_ group: EventLoopGroup) throws -> (DirectSender, Channel, raw: Int32) {
        var ends: [Int32] = [0, 0]
        guard socketpair(AF_UNIX, Int32(SOCK_STREAM.rawValue), 0, &ends) == 0 else { throw WeftError(errno, "socketpair") }
        let duplicate = dup(ends[0])
        var timeout = timeval(tv_sec: 5, tv_usec: 0)   // a broken stream fails the test, never hangs it
        setsockopt(ends[1], SOL_SOCKET, SO_RCVTIMEO, &timeout, socklen_t(MemoryLayout<timeval>.size))
        let channel = try ClientBootstrap(group: group).withConnectedSocket(ends[0]).wait()
        return (DirectSender(descriptor: duplicate, channel: channel), channel, ends[1])
    }

    func testFramesFromManyThreadsArriveWholeAndInOrderWhenTheReaderLagsBehind() throws {
        let group = MultiThreadedEventLoopGroup(numberOfThreads: 1)
        defer { try? group.syncShutdownGracefully() }
        let (sender, channel, raw) = try senderPair(group)
        defer { Glibc.close(raw) }
        let threads = 4, framesPerThread = 150
        // Frame: u32 length, u8 thread, u32 sequence, then `length - 5` bytes of (thread ^ sequence).
        @Sendable func frame(_ thread: Int, _ sequence: Int) -> ByteBuffer {
            let body = (sequence * 7919 + thread * 104_729) % (192 * 1024) + 1
            var buffer = ByteBufferAllocator().buffer(capacity: 9 + body)
            buffer.writeInteger(UInt32(5 + body), endianness: .little)
            buffer.writeInteger(UInt8(thread))
            buffer.writeInteger(UInt32(sequence), endianness: .little)
            buffer.writeRepeatingByte(UInt8(truncatingIfNeeded: thread ^ sequence), count: body)
            return buffer
        }
        // First nobody reads: the socket fills and later frames queue on the channel. Then the
        // same threads send more while the test reads, so the socket drains while frames still
        // wait in the channel's queue (a frame sent directly then would overtake them).
        let firstRound = 60
        func sendAll(_ range: Range<Int>, pace: Bool) -> DispatchGroup {
            let sent = DispatchGroup()
            for thread in 0..<threads {
                sent.enter()
                Thread.detachNewThread {
                    for sequence in range {
                        sender.send(frame(thread, sequence))
                        if pace && sequence % 8 == 0 { usleep(300) }
                    }
                    sent.leave()
                }
            }
            return sent
        }
        XCTAssertEqual(sendAll(0..<firstRound, pace: false).wait(timeout: .now() + 20), .success,
                       "no sender blocked on the full socket")
        let secondRound = sendAll(firstRound..<framesPerThread, pace: true)

        var next = [Int](repeating: 0, count: threads)
        for _ in 0..<(threads * framesPerThread) {
            guard let prefix = receiveFully(raw, 4) else { return XCTFail("stream ended early") }
            let length = Int(prefix.withUnsafeBytes { $0.loadUnaligned(as: UInt32.self) })
            guard length >= 5 && length <= 5 + 192 * 1024 else { return XCTFail("a frame length of \(length): frames mixed up") }
            guard let rest = receiveFully(raw, length) else { return XCTFail("stream ended inside a frame") }
            let thread = Int(rest[0])
            let sequence = Int(rest.withUnsafeBytes { $0.loadUnaligned(fromByteOffset: 1, as: UInt32.self) })
            XCTAssertLessThan(thread, threads)
            guard thread < threads else { return }
            XCTAssertEqual(sequence, next[thread], "thread \(thread)'s frames arrive in the order it sent them")
            let fill = UInt8(truncatingIfNeeded: thread ^ sequence)
            XCTAssertTrue(rest[5...].allSatisfy { $0 == fill }, "frame \(thread)/\(sequence) is not interleaved with another")
            next[thread] = sequence + 1
        }
        XCTAssertEqual(next, [Int](repeating: framesPerThread, count: threads))
        XCTAssertEqual(secondRound.wait(timeout: .now() + 20), .success)

        // Once the channel is closed, frames are dropped, and the duplicate descriptor is gone.
        // The sender closes in a close-future callback, and NIO completes the close future in a
        // loop task queued after `close()`'s own promise: wait for the close future (its
        // callbacks run in the order they were added, the sender's first), then for one more
        // loop task, so that every callback of that task has run.
        try channel.close().wait()
        try channel.closeFuture.wait()
        try channel.eventLoop.submit {}.wait()
        sender.send(frame(0, 0))
        var byte: UInt8 = 0
        XCTAssertEqual(recv(raw, &byte, 1, 0), 0, "the peer sees the end of the stream, and nothing after it")
    }

    func testAHubNeverHoldsAWorkerForAnAgentThatDoesNotRead() throws {
        let hub = FakeHub()
        // Two workers: if a response to the silent agent held one each, nobody else would be served.
        let server = HubServer(hub: hub, logger: logger, workerThreads: 2, eventLoopThreads: 1)
        let port = try server.listen(host: "127.0.0.1", port: 0)
        defer { server.shutdown() }
        let client = RemoteHub(address: .tcp(host: "127.0.0.1", port: port), requestTimeoutMs: 5000, logger: logger)
        defer { client.close() }
        let (session, _) = try client.openSession(agentName: "reader")
        let c = RequestContext(session: session, credentials: .root)
        let data = (0..<(4 << 20)).map { UInt8(truncatingIfNeeded: $0 &* 31 &+ $0 >> 12) }
        try client.writeSlice(c, id: 5, data: data)

        // 24 reads of 4 MiB (96 MiB, far beyond the socket buffers), and no reading of answers.
        let before = hub.snapshot { $0.seenSessions.count }
        let silent = try RawSocket(port: port)
        var requests: [UInt8] = []
        for id in 1...24 {
            requests += WireCodec.encodeRequest(id: UInt64(id), .readSlice(c, id: 5, offset: 0, length: UInt32(data.count)))
        }
        try silent.send(requests)
        let deadline = Date().addingTimeInterval(10)
        while hub.snapshot({ $0.seenSessions.count }) < before + 24 && Date() < deadline { usleep(10_000) }
        XCTAssertEqual(hub.snapshot { $0.seenSessions.count }, before + 24, "the hub ran all the silent agent's reads")

        for ino in 1...50 {
            XCTAssertEqual(try client.getattr(c, ino: InodeID(ino)).ino, InodeID(ino), "others are served meanwhile")
        }

        // Every answer then arrives whole.
        var answered = Set<UInt64>()
        for _ in 1...24 {
            let prefix = try silent.receive(count: 4)
            let frame = prefix + (try silent.receive(count: Int(prefix.withUnsafeBytes { $0.loadUnaligned(as: UInt32.self) })))
            let decoded = try WireCodec.decodeFrame(frame)
            guard case .bytes(let bytes) = try WireCodec.decodeResponse(decoded).get() else { return XCTFail("not bytes") }
            XCTAssertTrue(bytes == data, "answer \(decoded.requestID) is the slice")
            answered.insert(decoded.requestID)
        }
        XCTAssertEqual(answered, Set(1...24))
    }

    func testEverySessionOfAConnectionThatEndsAsItsOpenIsAnsweredIsClosed() throws {
        // The open's reply and the connection's end race: the hub must record the session before
        // it counts the open as done, or the end finds nothing to close and the session leaks.
        let hub = FakeHub()
        let server = HubServer(hub: hub, logger: logger, workerThreads: 4, eventLoopThreads: 1)
        let port = try server.listen(host: "127.0.0.1", port: 0)
        defer { server.shutdown() }
        let anyContext = RequestContext(session: 0, credentials: .root)
        var frames = WireCodec.encodeRequest(id: 1, .openSession(agentName: "brief"))
        for id in 2...4 { frames += WireCodec.encodeRequest(id: UInt64(id), .getattr(anyContext, ino: InodeID(id))) }
        for _ in 0..<300 {
            let socket = try RawSocket(port: port)
            try socket.send(frames)
        }   // each socket closes as soon as its frames are out, answers unread
        // (A connection reset before the hub read its frames opens nothing: count what ran.)
        let deadline = Date().addingTimeInterval(20)
        while (server.connectionCount > 0 || !hub.snapshot({ $0.openedSessions.isEmpty })) && Date() < deadline {
            usleep(10_000)
        }
        let (open, closed) = hub.snapshot { ($0.openedSessions.count, $0.closedSessions.count) }
        XCTAssertEqual(open, 0, "every session opened is closed with its connection (\(closed) closed)")
        XCTAssertGreaterThan(closed, 100, "most connections opened their session before they ended")
        XCTAssertEqual(Set(hub.snapshot { $0.closedSessions }).count, closed, "each exactly once")
    }

    func testConnectingToANameThatDoesNotResolveSaysSo() throws {
        let client = RemoteHub(address: .tcp(host: "no-such-hub.invalid", port: 7000), connectTimeoutMs: 1500,
                               requestTimeoutMs: 1000, logger: logger)
        defer { client.close() }
        let start = Date()
        XCTAssertThrowsError(try client.status()) {
            let error = $0 as? WeftError
            XCTAssertEqual(error?.errno, EIO)
            XCTAssertTrue(error?.message.hasPrefix("hub no-such-hub.invalid:7000 does not answer (cannot resolve no-such-hub.invalid")
                          ?? false, "\($0)")
        }
        XCTAssertLessThan(Date().timeIntervalSince(start), 3.0, "within the connect bound")
    }

    func testListeningOnAUnixPathThatHoldsAnotherFileFailsAndLeavesIt() throws {
        let path = NSTemporaryDirectory() + "weft-net-\(getpid())-\(UInt32.random(in: 0...UInt32.max)).sock"
        defer { unlink(path) }
        XCTAssertTrue(FileManager.default.createFile(atPath: path, contents: Data("keep".utf8)))
        let server = HubServer(hub: FakeHub(), logger: logger, workerThreads: 1, eventLoopThreads: 1)
        defer { server.shutdown() }
        XCTAssertThrowsError(try server.listen(unixSocketPath: path)) {
            XCTAssertEqual(($0 as? WeftError)?.errno, EADDRINUSE, "\($0)")
        }
        XCTAssertEqual(FileManager.default.contents(atPath: path), Data("keep".utf8), "the file is untouched")

        // A socket file left by a dead server is replaced.
        unlink(path)
        let stale = socket(AF_UNIX, Int32(SOCK_STREAM.rawValue), 0)
        var address = sockaddr_un()
        address.sun_family = sa_family_t(AF_UNIX)
        withUnsafeMutableBytes(of: &address.sun_path) { raw in
            raw.copyBytes(from: Array(path.utf8) + [0])
        }
        let bound = withUnsafePointer(to: &address) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { bind(stale, $0, socklen_t(MemoryLayout<sockaddr_un>.size)) }
        }
        Glibc.close(stale)
        XCTAssertEqual(bound, 0)
        try server.listen(unixSocketPath: path)
        let client = RemoteHub(address: try HubAddress.parse("unix:" + path), logger: logger)
        defer { client.close() }
        XCTAssertEqual(try client.status().inodes, 77)
    }
}
