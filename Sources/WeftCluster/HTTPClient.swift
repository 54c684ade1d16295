#if canImport(Glibc)
import Glibc
#endif
import Foundation
import NIOCore
import NIOHTTP1
import NIOPosix
import WeftProto

/// A minimal blocking HTTP/1.1 client for etcd's JSON gateway: POST a JSON body, get the
/// status and body, or stream the body as newline-separated JSON messages.
///
/// Every request uses its own connection (the cluster map changes rarely; watches hold theirs).
/// Every call is bounded: connecting by `connectTimeoutMs`, a whole request by its timeout.
final class HTTPClient: @unchecked Sendable {
    let host: String
    let port: Int
    let group: MultiThreadedEventLoopGroup
    let connectTimeoutMs: Int
    /// Guards `closed` and `connecting`.
    private let state = NSCondition()
    private var closed = false
    /// Connects under way: `shutdown` waits for them, so that none starts on a group that is
    /// gone (NIO traps on the promise such a connect leaves behind).
    private var connecting = 0

    init(host: String, port: Int, group: MultiThreadedEventLoopGroup, connectTimeoutMs: Int = 3000) {
        self.host = host
        self.port = port
        self.group = group
        self.connectTimeoutMs = connectTimeoutMs
    }

    /// Ends the client: requests from now on fail with ESHUTDOWN; connects under way finish
    /// (each within `connectTimeoutMs`), then the event loop group shuts down, which closes
    /// open requests and watches.
    func shutdown() {
        state.lock()
        closed = true
        let deadline = Date(timeIntervalSinceNow: Double(connectTimeoutMs) / 1000 + 1)
        while connecting > 0, state.wait(until: deadline) {}
        state.unlock()
        try? group.syncShutdownGracefully()
    }

    var displayName: String { "\(host):\(port)" }

    /// POSTs `body` to `path`; returns the status code and the whole response body.
    func post(_ path: String, body: Data, timeoutMs: Int) throws -> (Int, Data) {
        let collector = BodyCollector()
        let stream = try open(path, body: body, collector: collector)
        defer { stream.close() }
        return try collector.waitForEnd(timeoutMs: timeoutMs, peer: displayName)
    }

    /// POSTs `body` to `path` and calls `onMessage` with each newline-terminated message of the
    /// streamed response, on an event loop thread, until the stream ends or is closed.
    func stream(_ path: String, body: Data, onMessage: @escaping (Data) -> Void,
                onEnd: @escaping (Error?) -> Void) throws -> HTTPStream {
        let splitter = LineSplitter(onMessage: onMessage, onEnd: onEnd)
        return try open(path, body: body, collector: splitter)
    }

    private func open(_ path: String, body: Data, collector: ResponseSink) throws -> HTTPStream {
        state.lock()
        guard !closed else {
            state.unlock()
            throw WeftError(ESHUTDOWN, "etcd client for \(displayName) is closed")
        }
        connecting += 1
        state.unlock()
        defer {
            state.lock()
            connecting -= 1
            state.broadcast()
            state.unlock()
        }
        let channel: Channel
        do {
            channel = try ClientBootstrap(group: group)
                .connectTimeout(.milliseconds(Int64(connectTimeoutMs)))
                .channelInitializer { channel in
                    channel.eventLoop.makeCompletedFuture {
                        try channel.pipeline.syncOperations.addHTTPClientHandlers()
                        try channel.pipeline.syncOperations.addHandler(ResponseHandler(sink: collector))
                    }
                }
                .connect(host: host, port: port).wait()
        } catch {
            throw WeftError(EIO, "etcd at \(displayName) does not answer (\(error))")
        }
        var head = HTTPRequestHead(version: .http1_1, method: .POST, uri: path)
        head.headers.add(name: "Host", value: "\(host):\(port)")
        head.headers.add(name: "Content-Type", value: "application/json")
        head.headers.add(name: "Content-Length", value: "\(body.count)")
        var buffer = channel.allocator.buffer(capacity: body.count)
        buffer.writeBytes(body)
        channel.write(HTTPClientRequestPart.head(head), promise: nil)
        channel.write(HTTPClientRequestPart.body(.byteBuffer(buffer)), promise: nil)
        channel.writeAndFlush(HTTPClientRequestPart.end(nil), promise: nil)
        return HTTPStream(channel: channel)
    }
}

/// An open request; closing it ends a streamed response.
final class HTTPStream: @unchecked Sendable {
    let channel: Channel

    init(channel: Channel) {
        self.channel = channel
    }

    func close() {
        channel.close(promise: nil)
    }
}

protocol ResponseSink: AnyObject {
    func head(_ status: Int)
    func body(_ bytes: ByteBuffer)
    func end(_ error: Error?)
}

/// Collects a whole response and lets one thread wait for it.
final class BodyCollector: ResponseSink, @unchecked Sendable {
    private let condition = NSCondition()
    private var status = 0
    private var data = Data()
    private var finished = false
    private var failure: Error?

    func head(_ status: Int) {
        condition.lock()
        self.status = status
        condition.unlock()
    }

    func body(_ bytes: ByteBuffer) {
        condition.lock()
        data.append(contentsOf: bytes.readableBytesView)
        condition.unlock()
    }

    func end(_ error: Error?) {
        condition.lock()
        if !finished {
            finished = true
            failure = error
        }
        condition.broadcast()
        condition.unlock()
    }

    func waitForEnd(timeoutMs: Int, peer: String) throws -> (Int, Data) {
        let deadline = Date(timeIntervalSinceNow: Double(timeoutMs) / 1000)
        condition.lock()
        defer { condition.unlock() }
        while !finished {
            if !condition.wait(until: deadline) {
                throw WeftError(ETIMEDOUT, "etcd at \(peer) did not answer within \(timeoutMs) ms")
            }
        }
        if let failure, status == 0 { throw WeftError(EIO, "etcd at \(peer): \(failure)") }
        return (status, data)
    }
}

/// Cuts a streamed body into newline-terminated messages.
final class LineSplitter: ResponseSink, @unchecked Sendable {
    private var pending = Data()
    private var status = 0
    private var ended = false
    private let onMessage: (Data) -> Void
    private let onEnd: (Error?) -> Void

    init(onMessage: @escaping (Data) -> Void, onEnd: @escaping (Error?) -> Void) {
        self.onMessage = onMessage
        self.onEnd = onEnd
    }

    func head(_ status: Int) {
        self.status = status
    }

    func body(_ bytes: ByteBuffer) {
        pending.append(contentsOf: bytes.readableBytesView)
        while let newline = pending.firstIndex(of: 0x0A) {
            let line = pending[pending.startIndex..<newline]
            pending.removeSubrange(pending.startIndex...newline)
            if !line.isEmpty { onMessage(Data(line)) }
        }
    }

    func end(_ error: Error?) {
        guard !ended else { return }
        ended = true
        if !pending.isEmpty, status == 200 { onMessage(pending) }
        onEnd(error ?? (status == 200 ? nil : WeftError(EIO, "etcd answered HTTP \(status)")))
    }
}

/// Passes one HTTP response to its sink.
final class ResponseHandler: ChannelInboundHandler {
    typealias InboundIn = HTTPClientResponsePart

    let sink: ResponseSink

    init(sink: ResponseSink) {
        self.sink = sink
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        switch unwrapInboundIn(data) {
        case .head(let head): sink.head(Int(head.status.code))
        case .body(let bytes): sink.body(bytes)
        case .end:
            sink.end(nil)
            context.close(promise: nil)
        }
    }

    func channelInactive(context: ChannelHandlerContext) {
        sink.end(WeftError(EIO, "connection closed"))
        context.fireChannelInactive()
    }

    func errorCaught(context: ChannelHandlerContext, error: Error) {
        sink.end(error)
        context.close(promise: nil)
    }
}
