#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif
import Logging
import NIOCore
import NIOPosix
import Synchronization
import WeftProto

/// What a connection handler shares with its server: the hub, the worker pool, the limits, and
/// the count of connections not yet fully wound down (for an orderly shutdown).
final class ServerCore: @unchecked Sendable {
    let hub: HubAPI
    let pool: NIOThreadPool
    let logger: Logger
    let maxInFlightRequestsPerConnection: Int

    private let lock = PthreadMutex()
    private let idle = ConditionVariable()
    private var liveConnections = 0

    init(hub: HubAPI, pool: NIOThreadPool, logger: Logger, maxInFlightRequestsPerConnection: Int) {
        self.hub = hub
        self.pool = pool
        self.logger = logger
        self.maxInFlightRequestsPerConnection = maxInFlightRequestsPerConnection
    }

    func connectionStarted() {
        lock.withLock { liveConnections += 1 }
    }

    func connectionFinished() {
        lock.withLock {
            liveConnections -= 1
            precondition(liveConnections >= 0)
            if liveConnections == 0 { idle.broadcast() }
        }
    }

    /// Waits until every connection has finished its requests and closed its sessions; false on timeout.
    func waitUntilIdle(timeoutMs: Int) -> Bool {
        let deadline = MonotonicClock.deadlineNs(afterMs: timeoutMs)
        return lock.withLock {
            while liveConnections > 0 {
                if !idle.wait(lock, deadlineNs: deadline) { return false }
            }
            return true
        }
    }

    /// What a worker produced for one request frame.
    enum Outcome {
        case respond(ByteBuffer, SessionChange)
        /// The frame is malformed: the connection must close.
        case violation(WeftError)
    }

    enum SessionChange {
        case none
        case opened(SessionID)
        case closed(SessionID)
    }

    /// Decodes and runs one request on the calling (worker) thread and encodes its response.
    func execute(_ frame: InboundFrame, allocator: ByteBufferAllocator, cancelled: Bool, leases: ConnectionLeases?) -> Outcome {
        let id = frame.header.requestID
        guard let opcode = HubOpcode(rawValue: frame.header.opcode) else {
            // A newer agent's method: answered, not fatal (SPEC.md §Wire protocol, versioning).
            let error = WeftError(ENOSYS, "opcode \(frame.header.opcode) is unknown to this hub")
            return .respond(WireCodec.responseBuffer(id: id, rawOpcode: frame.header.opcode, .failure(error),
                                                     allocator: allocator), .none)
        }
        if !cancelled, let outcome = executeBulk(opcode, frame, allocator: allocator) { return outcome }
        let request: HubRequest
        do {
            request = try WireCodec.decodeRequest(opcode: opcode, payload: frame.payload)
        } catch let error as WeftError {
            return .violation(WeftError(error.errno, "\(opcode) request \(id): \(error.message)"))
        } catch {
            return .violation(WeftError(EBADMSG, "\(opcode) request \(id): \(error)"))
        }
        let result: Result<HubResponse, WeftError>
        if cancelled {
            result = .failure(WeftError(ESHUTDOWN, "hub is shutting down"))
        } else if case .enableLeases(let session) = request {
            // Recalls for this session go back on this connection.
            result = Result {
                guard let leases else { throw WeftError(EINVAL, "no connection to call back on") }
                try hub.enableLeases(session, client: SessionLeaseClient(session: session, connection: leases))
                return .empty
            }.mapError { $0 as? WeftError ?? WeftError(EIO, "\($0)") }
        } else {
            result = request.perform(on: hub)
        }
        var change = SessionChange.none
        switch (request, result) {
        case (.openSession, .success(.session(let session, _))), (.openVolumeSession, .success(.session(let session, _))):
            change = .opened(session)
        case (.closeSession(let session), .success): change = .closed(session)
        default: break
        }
        return .respond(WireCodec.responseBuffer(id: id, rawOpcode: opcode.rawValue, result, allocator: allocator), change)
    }

    /// writeSlice, readSlice and readSliceFrom without intermediate arrays (SPEC.md §4, Bulk
    /// transfers): written data is stored from the frame (page-aligned by `detachingBulk`, so
    /// the store writes it direct); read data goes straight into the response frame. Nil for any other request (and
    /// for a read over the transfer limit: the general path answers it with the hub's error).
    private func executeBulk(_ opcode: HubOpcode, _ frame: InboundFrame, allocator: ByteBufferAllocator) -> Outcome? {
        let id = frame.header.requestID
        switch opcode {
        case .writeSlice:
            let result: Result<HubResponse, WeftError>
            do {
                result = try frame.payload.withUnsafeReadableBytes { raw in
                    var reader = ByteReader(raw)
                    let context = try RequestContext.decode(from: &reader)
                    let (sliceID, data) = try HubRequest.decodeWriteSliceTail(from: &reader)
                    guard reader.isAtEnd else { throw WireCodec.trailingBytes(reader.remaining, opcode) }
                    return Result {
                        // Data of 64 KiB and more was put on a page by `detachingBulk`.
                        try hub.writeSlice(context, id: sliceID, bytes: data)
                        return .empty
                    }.mapError { $0 as? WeftError ?? WeftError(EIO, "hub failed: \($0)") }
                }
            } catch let error as WeftError {
                return .violation(WeftError(error.errno, "\(opcode) request \(id): \(error.message)"))
            } catch {
                return .violation(WeftError(EBADMSG, "\(opcode) request \(id): \(error)"))
            }
            return .respond(WireCodec.responseBuffer(id: id, rawOpcode: opcode.rawValue, result, allocator: allocator), .none)
        case .readSlice, .readSliceFrom:
            guard let request = try? WireCodec.decodeRequest(opcode: opcode, payload: frame.payload) else { return nil }
            switch request {
            case let .readSlice(context, sliceID, offset, length) where Int(length) <= Limits.transferMaxBytes:
                return .respond(WireCodec.bulkResponseBuffer(id: id, rawOpcode: opcode.rawValue, count: Int(length),
                                                             allocator: allocator) {
                    try hub.readSlice(context, id: sliceID, offset: offset, into: $0)
                }, .none)
            case let .readSliceFrom(context, sliceID, offset, length, holders) where Int(length) <= Limits.transferMaxBytes:
                return .respond(WireCodec.bulkResponseBuffer(id: id, rawOpcode: opcode.rawValue, count: Int(length),
                                                             allocator: allocator) {
                    try hub.readSlice(context, id: sliceID, offset: offset, holders: holders, into: $0)
                }, .none)
            default:
                return nil
            }
        default:
            return nil
        }
    }

    /// Ends `sessions` on the worker pool, then marks the connection finished.
    func closeSessions(_ sessions: [SessionID], peer: String) {
        if sessions.isEmpty {
            connectionFinished()
            return
        }
        pool.submit { [self] _ in
            for session in sessions {
                do {
                    try hub.closeSession(session)
                    logger.debug("closed session of departed agent", metadata: ["peer": "\(peer)", "session": "\(session)"])
                } catch {
                    logger.warning("could not close session of departed agent",
                                   metadata: ["peer": "\(peer)", "session": "\(session)", "error": "\(error)"])
                }
            }
            connectionFinished()
        }
    }
}

/// Serves one agent connection on its event loop.
///
/// Guarantees: requests run on the worker pool, never on the event loop; each response is written
/// as soon as it is ready, tagged with its request id (so possibly out of order); at most
/// `maxInFlightRequestsPerConnection` requests of the connection run at once, and beyond that the
/// handler stops reading from the socket (frames already read wait in order); when the connection
/// ends, after its last request has finished, every session opened through it and not closed is
/// closed on the hub.
final class HubConnectionHandler: ChannelDuplexHandler {
    typealias InboundIn = InboundFrame
    typealias OutboundIn = ByteBuffer
    typealias OutboundOut = ByteBuffer

    private let core: ServerCore
    /// Writes this connection's responses and recalls from the threads that make them.
    private let sender: DirectSender
    private var context: ChannelHandlerContext?
    private var peer = "unknown peer"
    /// What the workers share with the loop.
    private let flow = Flow()

    /// Requests of one connection in flight, and whether its loop must hear of their finishes.
    final class Flow: Sendable {
        /// Requests dispatched and not finished: raised by the loop, lowered by the workers, which
        /// tell the loop of a finish only when it asked (`loopWanted`); a request that opens or
        /// closes a session, or a malformed one, is finished on the loop. Waking the loop for
        /// every response cost as much as the hand-off that direct sends remove (SPEC.md §4).
        let running = Atomic<Int>(0)
        /// Set by the loop while it must hear of every finish: reading is withheld, frames wait,
        /// or the connection ended. The loop sets it, then looks at `running` again; a worker
        /// lowers `running`, then looks at this (both sequentially consistent): one of them sees
        /// the other.
        let loopWanted = Atomic<Bool>(false)
    }
    private var inFlight: Int { flow.running.load(ordering: .sequentiallyConsistent) }
    /// Frames read while `inFlight` was at its bound; never longer than one socket read's worth.
    private var waiting = CircularBuffer<InboundFrame>(initialCapacity: 16)
    private var readWithheld = false
    private var sessions: Set<SessionID> = []
    /// False once the channel is inactive or the handler removed.
    private var isOpen = true
    /// True once a malformed frame was seen: nothing more is dispatched.
    private var isClosing = false
    private var sessionsReleased = false
    private var leases: ConnectionLeases?

    init(core: ServerCore, sender: DirectSender) {
        self.core = core
        self.sender = sender
    }

    func handlerAdded(context: ChannelHandlerContext) {
        self.context = context
        if let address = context.channel.remoteAddress {
            peer = address.description
        } else if let local = context.channel.localAddress {
            peer = "unix peer on \(local)"
        }
        leases = ConnectionLeases(channel: context.channel, sender: sender)
        core.connectionStarted()
        core.logger.debug("agent connected", metadata: ["peer": "\(peer)"])
    }

    func handlerRemoved(context: ChannelHandlerContext) {
        connectionEnded()
        self.context = nil
    }

    func channelInactive(context: ChannelHandlerContext) {
        connectionEnded()
        context.fireChannelInactive()
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        let frame = unwrapInboundIn(data)
        guard isOpen, !isClosing else { return }
        leases?.heard()
        if frame.header.kind == .response, frame.header.opcode == HubOpcode.recall.rawValue {
            leases?.answered(frame.header.requestID)
            return
        }
        guard frame.header.kind == .request else {
            closeForViolation(WeftError(EPROTO, "a \(frame.header.kind) frame was sent to the hub"))
            return
        }
        let request = Self.detachingBulk(frame)
        if waiting.isEmpty && inFlight < core.maxInFlightRequestsPerConnection {
            dispatch(request)
        } else {
            waiting.append(request)
            wantLoop()
        }
    }

    /// A writeSlice frame with its payload copied out of the receive buffer here, on the event
    /// loop, so that its data starts on a page boundary (SPEC.md §4, Bulk transfers): the store
    /// writes it direct with no further copy, and the receive buffer is not kept shared while
    /// the next frames arrive (NIO would copy their bytes once more). Other frames, small ones
    /// and malformed ones (the worker reports those) pass unchanged.
    static func detachingBulk(_ frame: InboundFrame) -> InboundFrame {
        guard frame.header.opcode == HubOpcode.writeSlice.rawValue,
              frame.payload.readableBytes >= Limits.blockSizeBytes,
              let headBytes = try? frame.payload.withUnsafeReadableBytes({ raw -> Int in
                  var reader = ByteReader(raw)
                  _ = try RequestContext.decode(from: &reader)
                  let (_, data) = try HubRequest.decodeWriteSliceTail(from: &reader)
                  return raw.count - data.count
              }) else { return frame }
        let pageBytes = BulkMemory.pageBytes
        let pad = (pageBytes - headBytes % pageBytes) % pageBytes
        var copy = BulkMemory.allocator.buffer(capacity: pad + frame.payload.readableBytes)
        copy.moveWriterIndex(forwardBy: pad)
        copy.moveReaderIndex(forwardBy: pad)
        var payload = frame.payload
        copy.writeBuffer(&payload)
        return InboundFrame(header: frame.header, payload: copy)
    }

    func read(context: ChannelHandlerContext) {
        if inFlight >= core.maxInFlightRequestsPerConnection || !context.channel.isWritable {
            readWithheld = true
            wantLoop()
        } else {
            context.read()
        }
    }

    func channelWritabilityChanged(context: ChannelHandlerContext) {
        resumeReading()
        context.fireChannelWritabilityChanged()
    }

    func userInboundEventTriggered(context: ChannelHandlerContext, event: Any) {
        if let idle = event as? IdleStateHandler.IdleStateEvent, idle == .read {
            core.logger.warning("closing silent agent connection: its sessions end",
                                metadata: ["peer": "\(peer)", "sessions": "\(sessions.count)"])
            context.close(promise: nil)
            return
        }
        context.fireUserInboundEventTriggered(event)
    }

    func errorCaught(context: ChannelHandlerContext, error: Error) {
        if let error = error as? WeftError {
            closeForViolation(error)
        } else {
            core.logger.info("closing agent connection after an error", metadata: ["peer": "\(peer)", "error": "\(error)"])
            context.close(promise: nil)
        }
    }

    private func dispatch(_ frame: InboundFrame) {
        guard let context else { return }
        flow.running.add(1, ordering: .sequentiallyConsistent)
        let core = self.core
        let loop = context.eventLoop
        let allocator = context.channel.allocator
        let handler = NIOLoopBound(self, eventLoop: loop)
        let leases = self.leases
        let sender = self.sender
        let flow = self.flow
        core.pool.submit { state in
            let outcome = core.execute(frame, allocator: allocator, cancelled: state == .cancelled, leases: leases)
            // A plain response leaves from this thread (SPEC.md §4, Direct sends). One that opens
            // or closes a session (or a malformed frame) goes through the loop, which records the
            // change before the agent can act on the reply, and only then counts the request done:
            // a connection that ends meanwhile then closes every session it opened, exactly once.
            guard case .respond(let buffer, .none) = outcome else {
                loop.execute { handler.value.finished(outcome, sender: sender) }
                return
            }
            sender.send(buffer)
            flow.running.subtract(1, ordering: .sequentiallyConsistent)
            if flow.loopWanted.load(ordering: .sequentiallyConsistent) {
                loop.execute { handler.value.catchUp() }
            }
        }
    }

    /// A request that opened or closed a session, or a malformed one: its bookkeeping, then its
    /// response, then it counts as finished.
    private func finished(_ outcome: ServerCore.Outcome, sender: DirectSender) {
        switch outcome {
        case .respond(let buffer, let change):
            switch change {
            case .none: break
            case .opened(let session): sessions.insert(session)
            case .closed(let session): sessions.remove(session)
            }
            sender.send(buffer)
        case .violation(let error):
            closeForViolation(error)
        }
        flow.running.subtract(1, ordering: .sequentiallyConsistent)
        catchUp()
    }

    /// Does what finished requests allow: dispatches waiting frames, resumes reading, releases
    /// the sessions of an ended connection; stops asking to hear of finishes when nothing waits.
    private func catchUp() {
        guard isOpen else {
            if inFlight == 0 { releaseSessions() }
            return
        }
        while !isClosing, inFlight < core.maxInFlightRequestsPerConnection, let next = waiting.popFirst() {
            dispatch(next)
        }
        resumeReading()
        if waiting.isEmpty && !readWithheld {
            flow.loopWanted.store(false, ordering: .sequentiallyConsistent)
        }
    }

    /// Asks the workers to report every finish, then looks once more at what may have finished
    /// meanwhile (a worker that finished before the flag was set did not report it).
    private func wantLoop() {
        flow.loopWanted.store(true, ordering: .sequentiallyConsistent)
        if inFlight < core.maxInFlightRequestsPerConnection, let loop = context?.eventLoop {
            // Not inline: the caller (channelRead, read) is in the middle of its own bookkeeping.
            let handler = NIOLoopBound(self, eventLoop: loop)
            loop.execute { handler.value.catchUp() }
        }
    }

    private func resumeReading() {
        guard readWithheld, isOpen, let context,
              inFlight < core.maxInFlightRequestsPerConnection, context.channel.isWritable else { return }
        readWithheld = false
        context.read()
    }

    private func closeForViolation(_ error: WeftError) {
        guard isOpen, !isClosing else { return }
        isClosing = true
        waiting.removeAll()
        core.logger.warning("closing agent connection after a malformed frame",
                            metadata: ["peer": "\(peer)", "error": "\(error)"])
        context?.close(promise: nil)
    }

    /// Runs once, when the channel goes inactive or the handler is removed, whichever comes first.
    private func connectionEnded() {
        guard isOpen else { return }
        isOpen = false
        leases?.closed()
        waiting.removeAll()
        flow.loopWanted.store(true, ordering: .sequentiallyConsistent)
        core.logger.debug("agent disconnected", metadata: ["peer": "\(peer)", "sessions": "\(sessions.count)"])
        if inFlight == 0 { releaseSessions() }
    }

    private func releaseSessions() {
        guard !sessionsReleased else { return }
        sessionsReleased = true
        core.closeSessions(Array(sessions), peer: peer)
        sessions.removeAll()
    }
}
