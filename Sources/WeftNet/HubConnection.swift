#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif
import CWeftSupport
import Foundation
import Logging
import NIOCore
import NIOPosix
import WeftChunks
import WeftProto

/// One agent connection as the hub's reading threads serve it (SPEC.md §4, Serving threads).
///
/// Guarantees: at most one thread reads the connection at a time (the epoll registration is
/// one-shot and re-armed only by that thread, or by a finish while reading is withheld); the
/// first request of a read runs on the reading thread when another reading thread is still
/// waiting, every other request on the worker pool; at most `maxInFlightRequestsPerConnection`
/// requests run at once, and beyond that the connection is not re-armed (frames already read
/// wait in order); `fence` is taken only as the first request and runs on the reading thread
/// before anything read with it; once the connection is fenced nothing not yet started runs; a
/// response that opens or closes a session is recorded before it is sent; when the connection
/// ends, after its last request has finished, every session opened through it and not closed is
/// closed on the hub, exactly once; the reading descriptor is closed exactly once,
/// never while a thread reads it.
final class HubConnection: @unchecked Sendable {
    /// Most bytes one thread reads from a connection before it re-arms it and runs what it read.
    static let readTurnMaxBytes = 1 << 20

    let key: UInt64
    let channel: Channel
    let leases: ConnectionLeases
    let peer: String
    private let core: ServerCore
    private let sender: DirectSender
    private let reactor: HubReactor
    private var epoll: Int32 { reactor.epoll }
    var logger: Logger { core.logger }

    /// Bytes read and not yet split into frames: only the thread that holds the read turn
    /// touches it.
    private var frameReader: FrameReader

    private enum ReadState {
        /// Not yet in the epoll set (`start()` adds it).
        case unregistered
        /// Registered and armed: the kernel hands the next readiness to one reading thread.
        case armed
        /// A thread is reading; it re-arms, withholds, or closes the descriptor when done.
        case reading
        /// Not armed: at the in-flight bound, frames waiting, or the channel not writable.
        case withheld
    }

    // Guarded by `lock`.
    private let lock = PthreadMutex()
    private var state = ReadState.unregistered
    /// The reading duplicate of the socket; -1 once closed.
    private var descriptor: Int32
    private var isOpen = true
    /// A malformed frame or the end of the stream was read: nothing more is dispatched or read.
    private var isClosing = false
    /// NIO closed the channel on its own (the peer hung up, a write failed): the reading threads
    /// still read what the socket holds, to its end of file (`channelClosedByNIO` shuts the read
    /// side down, so that end comes), then end the connection.
    private var channelClosed = false
    /// A newer connection of the same client fenced this one (SPEC.md §4, Fences): requests not
    /// yet started are dropped unrun.
    private var fenced = false
    private var fenceReason = ""
    /// A request has been read: `fence` is refused from then on (only a connection's first).
    private var readARequest = false
    private var inFlight = 0
    private var waiting = CircularBuffer<Received>(initialCapacity: 16)

    /// A request read, with the number the server's ledger gave it, and for a commit the key it
    /// is tracked under (SPEC.md §4, Barriers).
    private struct Received {
        var frame: InboundFrame
        var number: UInt64 = 0
        var commit: RequestLedger.Key?
    }

    /// Numbers a commit (tracked) or a barrier (what it waits for is what came before it).
    /// Other requests take no number. Call in reading order.
    private func numbered(_ frame: InboundFrame) -> Received {
        switch frame.header.opcode {
        case HubOpcode.commitSlices.rawValue:
            // A commit whose head does not decode is rejected when it runs; nothing to track.
            let key = try? frame.payload.withUnsafeReadableBytes { raw -> RequestLedger.Key in
                var reader = ByteReader(raw)
                let context = try RequestContext.decode(from: &reader)
                return core.ledgerKey(session: context.session, ino: try reader.u64())
            }
            guard let key else { return Received(frame: frame) }
            return Received(frame: frame, number: core.ledger.admit(key), commit: key)
        case HubOpcode.barrier.rawValue:
            return Received(frame: frame, number: core.ledger.admit(nil))
        default:
            return Received(frame: frame)
        }
    }
    private var sessions: Set<SessionID> = []
    private var sessionsReleased = false

    /// Takes ownership of `descriptor`, a duplicate of `channel`'s socket for reading.
    init(descriptor: Int32, peer: String, channel: Channel, sender: DirectSender, core: ServerCore, reactor: HubReactor) {
        self.key = reactor.makeKey()
        self.reactor = reactor
        self.descriptor = descriptor
        self.channel = channel
        self.sender = sender
        self.core = core
        self.leases = ConnectionLeases(channel: channel, sender: sender)
        self.frameReader = FrameReader(allocator: channel.allocator, bulkDataOffset: Self.writeSliceDataOffset)
        self.peer = peer
        core.connectionStarted()
        core.logger.debug("agent connected", metadata: ["peer": "\(peer)"])
    }

    /// Registers the connection with the reading threads. False if it already ended.
    func start() -> Bool {
        lock.withLock {
            guard isOpen, state == .unregistered else { return false }
            guard weft_epoll_add_oneshot(epoll, descriptor, key) == 0 else {
                core.logger.warning("cannot watch agent connection", metadata: [
                    "peer": "\(peer)", "error": "\(String(cString: strerror(errno)))"])
                return false
            }
            state = .armed
            return true
        }
    }

    // MARK: Reading (on a reading thread, which holds the read turn)

    /// The socket is readable (or ended): reads it, re-arms it, then runs what it read, the first
    /// request here when `mayRunHere`.
    func readable(mayRunHere: Bool) {
        let fd: Int32 = lock.withLock {
            guard isOpen, state == .armed, descriptor >= 0 else { return -1 }
            state = .reading
            return descriptor
        }
        guard fd >= 0 else { return }
        let (received, end) = frameReader.receive(fd, maxBytes: Self.readTurnMaxBytes)
        if received > 0 { leases.heard() }

        var frames: [InboundFrame] = []
        var violation: WeftError?
        do {
            frames = try frameReader.frames()
        } catch let error as WeftError {
            violation = error
        } catch {
            violation = WeftError(EPROTO, "\(error)")
        }
        var requests: [InboundFrame] = []
        requests.reserveCapacity(frames.count)
        for frame in frames {
            if frame.header.kind == .response, frame.header.opcode == HubOpcode.recall.rawValue {
                leases.answered(frame.header.requestID)
                continue
            }
            guard frame.header.kind == .request else {
                violation = WeftError(EPROTO, "a \(frame.header.kind) frame was sent to the hub")
                break
            }
            requests.append(Self.detachingBulk(frame))
        }

        var admitted: [Received] = []
        let endNow: Bool = lock.withLock {
            state = .withheld
            guard isOpen else {
                // Ended by another thread while this one read: the descriptor is this thread's to close.
                closeDescriptorLocked()
                return false
            }
            if !isClosing {
                for request in requests {
                    if request.header.opcode == HubOpcode.fence.rawValue, readARequest {
                        violation = WeftError(EPROTO, "fence is only a connection's first request")
                        break
                    }
                    readARequest = true
                    let item = numbered(request)
                    if waiting.isEmpty && inFlight < core.maxInFlightRequestsPerConnection {
                        inFlight += 1
                        admitted.append(item)
                    } else {
                        waiting.append(item)
                    }
                }
            }
            if end != nil || violation != nil {
                // Nothing more is read or dispatched from here on (`rearmLocked` looks at this).
                isClosing = true
                dropWaitingLocked()
                return true
            }
            // Not before a fence has answered: nothing read after it may start first (its
            // `finished` re-arms).
            if let first = admitted.first, Self.isFence(first) { return false }
            return !rearmLocked()
        }
        if let violation {
            core.logger.warning("closing agent connection after a malformed frame",
                                metadata: ["peer": "\(peer)", "error": "\(violation)"])
        }
        if endNow { self.end(violation != nil ? "malformed frame" : end ?? "cannot re-arm the connection") }
        // The others first: the one run here may block (an fsync, a recall), and they must not
        // wait for it.
        var toRun = admitted[...]
        if let first = toRun.first, Self.isFence(first) {
            // Before anything read with it (SPEC.md §4, Fences): a connection it finds overtaken
            // runs none of its requests, and it never waits for a worker that the requests it
            // fences may hold. It takes one lock and answers.
            run(first, cancelled: false)
            toRun = toRun.dropFirst()
        }
        for request in toRun.dropFirst(mayRunHere ? 1 : 0) { submit(request) }
        if mayRunHere, let first = toRun.first {
            if Self.isBarrier(first) { submit(first) } else { run(first, cancelled: false) }
        }
    }

    /// writeSlice and writeObject: the same payload, with bulk data to store.
    static func isBulkWrite(_ opcode: UInt16) -> Bool {
        opcode == HubOpcode.writeSlice.rawValue || opcode == HubOpcode.writeObject.rawValue
    }

    /// Where a writeSlice (or writeObject) payload of `payloadBytes` (at least a block) has its data, read from
    /// its first bytes `prefix`; nil for any other frame or while the prefix is too short. The
    /// frame reader receives such a frame with its data on a page boundary.
    static func writeSliceDataOffset(_ header: FrameHeader, payloadBytes: Int, prefix: UnsafeRawBufferPointer) -> Int? {
        guard isBulkWrite(header.opcode), payloadBytes >= Limits.blockSizeBytes else { return nil }
        var reader = ByteReader(prefix)
        guard (try? RequestContext.decode(from: &reader)) != nil, (try? reader.u64()) != nil,
              let count = try? reader.u32(), Int(count) == payloadBytes - reader.offset else { return nil }
        return reader.offset
    }

    /// A writeSlice frame whose data starts on a page boundary (SPEC.md §4, Bulk transfers): the
    /// store writes it direct with no further copy. The frame reader places most so as they
    /// arrive (`writeSliceDataOffset`); one it could not (its first bytes came alone, or it came
    /// whole in one read) is copied out of the receive buffer here. The receive buffer is not
    /// written once its frames are handed out (`FrameReader.frames`). Other frames, small ones
    /// and malformed ones (the worker reports those) pass unchanged.
    static func detachingBulk(_ frame: InboundFrame) -> InboundFrame {
        guard isBulkWrite(frame.header.opcode),
              frame.payload.readableBytes >= Limits.blockSizeBytes,
              let (headBytes, placed) = try? frame.payload.withUnsafeReadableBytes({ raw -> (Int, Bool) in
                  var reader = ByteReader(raw)
                  _ = try RequestContext.decode(from: &reader)
                  let (_, data) = try HubRequest.decodeWriteSliceTail(from: &reader)
                  return (raw.count - data.count, Int(bitPattern: data.baseAddress) % BulkMemory.pageBytes == 0)
              }) else { return frame }
        if placed { return frame }
        let pageBytes = BulkMemory.pageBytes
        let pad = (pageBytes - headBytes % pageBytes) % pageBytes
        var copy = BulkMemory.allocator.buffer(capacity: pad + frame.payload.readableBytes)
        copy.moveWriterIndex(forwardBy: pad)
        copy.moveReaderIndex(forwardBy: pad)
        var payload = frame.payload
        copy.writeBuffer(&payload)
        return InboundFrame(header: frame.header, payload: copy)
    }

    /// Call with `lock` held and the read turn free: arms the connection if it may read now.
    /// False if that failed (the caller ends the connection: nothing would ever read it).
    private func rearmLocked() -> Bool {
        guard isOpen, !isClosing, state == .withheld, descriptor >= 0, waiting.isEmpty,
              inFlight < core.maxInFlightRequestsPerConnection, channelClosed || channel.isWritable else { return true }
        guard weft_epoll_rearm_oneshot(epoll, descriptor, key) == 0 else {
            core.logger.error("cannot re-arm agent connection: it ends", metadata: [
                "peer": "\(peer)", "error": "\(String(cString: strerror(errno)))"])
            return false
        }
        state = .armed
        return true
    }

    /// Call with `lock` held, never while a thread reads the descriptor.
    private func closeDescriptorLocked() {
        guard descriptor >= 0 else { return }
        _ = weft_epoll_remove(epoll, descriptor)
        Glibc.close(descriptor)
        descriptor = -1
    }

    // MARK: Running requests

    private func submit(_ request: Received) {
        if Self.isBarrier(request) {
            // A barrier waits for requests that may sit in the pool's queue behind it: it waits
            // on a thread of its own, never on a worker (SPEC.md §4, Barriers).
            guard core.barrierThreads.startIfBelow(ServerCore.barrierThreadsMax) else {
                return run(request, cancelled: false, refused: true)
            }
            Thread.detachNewThread { [self] in
                defer { core.barrierThreads.end() }
                run(request, cancelled: false)
            }
            return
        }
        core.pool.submit { [self] state in run(request, cancelled: state == .cancelled) }
    }

    private static func isBarrier(_ request: Received) -> Bool {
        request.frame.header.opcode == HubOpcode.barrier.rawValue
    }

    private static func isFence(_ request: Received) -> Bool {
        request.frame.header.opcode == HubOpcode.fence.rawValue
    }

    /// Drops the requests waiting for a slot, unrun. Call with `lock` held.
    private func dropWaitingLocked() {
        while let dropped = waiting.popFirst() { core.ledger.finish(dropped.number, key: dropped.commit) }
    }

    /// Runs one request and sends its response from this thread (SPEC.md §4, Direct sends).
    private func run(_ received: Received, cancelled: Bool, refused: Bool = false) {
        defer { core.ledger.finish(received.number, key: received.commit) }
        if lock.withLock({ fenced }) { return finished() }
        let outcome = core.execute(received.frame, number: received.number, allocator: channel.allocator,
                                   cancelled: cancelled, refused: refused, leases: leases, connection: self)
        switch outcome {
        case .respond(let response, let change):
            switch change {
            case .none: break
            case .opened(let session): lock.withLock { _ = sessions.insert(session) }
            case .closed(let session): lock.withLock { _ = sessions.remove(session) }
            }
            sender.send(response)
        case .respondBlocks(let head, let blocks):
            let outcome = sender.send(head, blocks: blocks)
            core.spanBytesSent.add(outcome.sentFromFile, ordering: .relaxed)
            core.spanBytesCopied.add(outcome.copied, ordering: .relaxed)
            core.spanBytesFromMemory.add(outcome.fromMemory, ordering: .relaxed)
            if outcome.readError != 0 {
                let reason = String(cString: strerror(outcome.readError))
                logger.error("chunk \(hex(blocks.id)) could not be read while it was sent: \(reason); the reader gets the error",
                             metadata: ["chunk": "\(hex(blocks.id))"])
            }
        case .violation(let error):
            closeForViolation(error)
        }
        if let reason = lock.withLock({ fenced ? fenceReason : nil }) { end("fenced: \(reason)") }
        finished()
    }

    /// One request finished: admits waiting frames, re-arms reading, or releases the sessions of
    /// an ended connection.
    private func finished() {
        var next: [Received] = []
        var armed = true
        let release: [SessionID]? = lock.withLock {
            inFlight -= 1
            guard isOpen else { return releaseSessionsLocked() }
            while !isClosing, inFlight < core.maxInFlightRequestsPerConnection, let frame = waiting.popFirst() {
                inFlight += 1
                next.append(frame)
            }
            armed = rearmLocked()
            return nil
        }
        for frame in next { submit(frame) }
        if let release { core.closeSessions(release, peer: peer) }
        if !armed { end("cannot re-arm the connection") }
    }

    /// The sessions to close, once, when the connection has ended and nothing runs. Call with `lock` held.
    private func releaseSessionsLocked() -> [SessionID]? {
        guard !isOpen, inFlight == 0, !sessionsReleased else { return nil }
        sessionsReleased = true
        defer { sessions.removeAll() }
        return Array(sessions)
    }

    // MARK: Events from the channel and the server

    /// The channel became writable again: reading may resume.
    func writable() {
        if !lock.withLock({ rearmLocked() }) { end("cannot re-arm the connection") }
    }

    private func closeForViolation(_ error: WeftError) {
        let first: Bool = lock.withLock {
            guard isOpen, !isClosing else { return false }
            isClosing = true
            dropWaitingLocked()
            return true
        }
        guard first else { return }
        core.logger.warning("closing agent connection after a malformed frame",
                            metadata: ["peer": "\(peer)", "error": "\(error)"])
        end("malformed frame")
    }

    /// NIO closed the channel by itself: the peer hung up (it may have sent frames just before:
    /// they still run), or a write failed. The reading threads read the socket to its end, then
    /// end the connection; one that no thread will read again ends now.
    func channelClosedByNIO() {
        let endNow: Bool = lock.withLock {
            guard isOpen else { return false }
            channelClosed = true
            if state == .withheld || state == .unregistered { return true }
            // Whatever the socket holds stays readable, then reads as end of file: the armed
            // descriptor fires even if the peer is still there (a write failed, say).
            if descriptor >= 0 { shutdown(descriptor, Int32(SHUT_RD)) }
            return false
        }
        if endNow { end("channel closed") }
    }

    /// A newer connection of the same agent replaced this one (SPEC.md §4, Fences): nothing not
    /// yet started runs (what waits for a slot, what the pool has not begun, what the socket
    /// still holds), and the connection ends. Requests already running finish.
    /// With `endNow` false (the connection is itself too old) it ends once the request that
    /// learned it has answered.
    func fence(because reason: String, endNow: Bool = true) {
        lock.withLock {
            fenced = true
            fenceReason = reason
        }
        if endNow { end("fenced: \(reason)") }
    }

    /// Ends the connection: no more reading, the channel closed, the sessions released once the
    /// last request has finished. Idempotent; from any thread.
    func end(_ reason: String) {
        let (wasOpen, release): (Bool, [SessionID]?) = lock.withLock {
            guard isOpen else { return (false, nil) }
            isOpen = false
            dropWaitingLocked()
            // A thread reading now closes the descriptor when it finishes.
            if state != .reading { closeDescriptorLocked() }
            return (true, releaseSessionsLocked())
        }
        guard wasOpen else { return }
        reactor.forget(key)
        leases.closed()
        channel.close(promise: nil)
        core.logger.debug("agent disconnected", metadata: ["peer": "\(peer)", "reason": "\(reason)"])
        if let release { core.closeSessions(release, peer: peer) }
    }
}

/// Tells a connection what its channel does: closes, becomes writable again. The channel is
/// output-only (a pipe channel on the socket): NIO never reads it; the reading threads do.
final class ConnectionWatch: ChannelInboundHandler {
    typealias InboundIn = ByteBuffer
    private let connection: HubConnection

    init(connection: HubConnection) {
        self.connection = connection
    }

    func channelInactive(context: ChannelHandlerContext) {
        connection.channelClosedByNIO()
        context.fireChannelInactive()
    }

    func channelWritabilityChanged(context: ChannelHandlerContext) {
        if context.channel.isWritable { connection.writable() }
        context.fireChannelWritabilityChanged()
    }

    func errorCaught(context: ChannelHandlerContext, error: Error) {
        connection.logger.info("closing agent connection after an error",
                               metadata: ["peer": "\(connection.peer)", "error": "\(error)"])
        context.close(promise: nil)
    }
}
