import NIOCore
import NIOPosix

/// One relayed connection: the accepted client channel, the channel to the target, and a
/// delayed, paced queue for each direction. Confined to the link's event loop.
final class RelayPipe {
    enum Side { case client, target }

    unowned let link: LinkEmulator
    let client: Channel
    var target: Channel?
    let forward: Direction  // client → target
    let backward: Direction  // target → client
    private var removed = false

    init(link: LinkEmulator, client: Channel) {
        self.link = link
        self.client = client
        forward = Direction(isForward: true)
        backward = Direction(isForward: false)
        forward.source = client
        backward.destination = client
    }

    func connectTarget() {
        guard target == nil, client.isActive else { return }
        ClientBootstrap(group: link.loop)
            .channelOption(ChannelOptions.autoRead, value: false)
            .channelOption(ChannelOptions.tcpOption(.tcp_nodelay), value: 1)
            .channelInitializer { [self] channel in
                channel.eventLoop.makeCompletedFuture {
                    try channel.pipeline.syncOperations.addHandler(RelayHandler(pipe: self, side: .target))
                }
            }
            .connect(host: link.targetHost, port: link.targetPort)
            .whenComplete { [self] result in
                switch result {
                case .success(let channel):
                    guard client.isActive else {
                        channel.close(promise: nil)
                        return
                    }
                    target = channel
                    forward.destination = channel
                    backward.source = channel
                    drain(forward)
                    resume()
                case .failure(let error):
                    link.logger.info("link cannot reach its target", metadata: ["error": "\(error)"])
                    closeBoth()
                }
            }
    }

    func pause() {
        for direction in [forward, backward] {
            direction.timer?.cancel()
            direction.timer = nil
        }
    }

    func resume() {
        guard !link.isCut else { return }
        if target == nil {
            connectTarget()
            return
        }
        for direction in [forward, backward] {
            drain(direction)
            readMore(direction)
        }
    }

    func closeBoth() {
        client.close(promise: nil)
        target?.close(promise: nil)
    }

    // MARK: Events from the handlers

    func clientActive() {
        if !link.isCut { connectTarget() }
    }

    func received(_ side: Side, _ buffer: ByteBuffer) {
        let direction = side == .client ? forward : backward
        let now = NIODeadline.now()
        var deliverAt = now + .milliseconds(Int64(link.settings.delayMs))
        if let rate = link.settings.rateBytesPerSecond {
            let lane = direction.isForward ? link.forwardLane : link.backwardLane
            let start = max(now, lane.freeAt)
            let wireTime = TimeAmount.nanoseconds(Int64(buffer.readableBytes) * 1_000_000_000 / Int64(rate))
            let freeAt = start + wireTime
            if direction.isForward { link.forwardLane.freeAt = freeAt } else { link.backwardLane.freeAt = freeAt }
            deliverAt = freeAt + .milliseconds(Int64(link.settings.delayMs))
        }
        // Never overtake earlier bytes (the delay may have been lowered meanwhile).
        deliverAt = max(deliverAt, direction.lastDeliverAt)
        direction.lastDeliverAt = deliverAt
        direction.queue.append((deliverAt, buffer))
        direction.queuedBytes += buffer.readableBytes
        if direction.timer == nil && !link.isCut { schedule(direction, at: deliverAt) }
    }

    func readComplete(_ side: Side) {
        readMore(side == .client ? forward : backward)
    }

    func inactive(_ side: Side) {
        let direction = side == .client ? forward : backward
        direction.sourceClosed = true
        // The other end of this side is gone too: whatever was bound for it is dropped.
        let opposite = side == .client ? backward : forward
        opposite.queue.removeAll()
        opposite.queuedBytes = 0
        drain(direction)
        if client.isActive == false && (target?.isActive ?? false) == false {
            guard !removed else { return }
            removed = true
            pause()
            link.removed(self)
        }
    }

    func writabilityChanged(_ side: Side) {
        // `side` is the destination of the direction that writes to it.
        readMore(side == .client ? backward : forward)
    }

    // MARK: Queues

    private func schedule(_ direction: Direction, at deadline: NIODeadline) {
        direction.timer?.cancel()
        direction.timer = link.loop.scheduleTask(deadline: deadline) { [self] in
            direction.timer = nil
            drain(direction)
        }
    }

    /// Delivers every queued buffer that is due, then re-arms for the next one.
    func drain(_ direction: Direction) {
        guard !link.isCut, let destination = direction.destination else { return }
        let now = NIODeadline.now()
        var wrote = false
        while let head = direction.queue.first, head.0 <= now {
            let buffer = head.1
            direction.queue.removeFirst()
            direction.queuedBytes -= buffer.readableBytes
            if direction.isForward {
                link.stats.bytesForward += UInt64(buffer.readableBytes)
            } else {
                link.stats.bytesBackward += UInt64(buffer.readableBytes)
            }
            destination.write(buffer, promise: nil)
            wrote = true
        }
        if wrote { destination.flush() }
        if let head = direction.queue.first {
            if direction.timer == nil { schedule(direction, at: head.0) }
        } else if direction.sourceClosed {
            destination.close(promise: nil)
        }
        readMore(direction)
    }

    /// Asks the source for more bytes unless the link is cut or the queue or the destination is full.
    private func readMore(_ direction: Direction) {
        guard !link.isCut, let source = direction.source, source.isActive, !direction.sourceClosed,
              direction.queuedBytes < LinkEmulator.queueHighWater,
              direction.destination?.isWritable ?? false else { return }
        source.read()
    }
}

/// One direction of a relayed connection.
final class Direction {
    let isForward: Bool
    var source: Channel?
    var destination: Channel?
    var queue = CircularBuffer<(NIODeadline, ByteBuffer)>()
    var queuedBytes = 0
    var lastDeliverAt = NIODeadline.uptimeNanoseconds(0)
    var timer: Scheduled<Void>?
    var sourceClosed = false

    init(isForward: Bool) {
        self.isForward = isForward
    }
}

/// Passes one channel's events to its pipe.
final class RelayHandler: ChannelInboundHandler {
    typealias InboundIn = ByteBuffer

    let pipe: RelayPipe
    let side: RelayPipe.Side

    init(pipe: RelayPipe, side: RelayPipe.Side) {
        self.pipe = pipe
        self.side = side
    }

    func channelActive(context: ChannelHandlerContext) {
        if side == .client { pipe.clientActive() }
        context.fireChannelActive()
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        pipe.received(side, unwrapInboundIn(data))
    }

    func channelReadComplete(context: ChannelHandlerContext) {
        pipe.readComplete(side)
    }

    func channelInactive(context: ChannelHandlerContext) {
        pipe.inactive(side)
        context.fireChannelInactive()
    }

    func channelWritabilityChanged(context: ChannelHandlerContext) {
        pipe.writabilityChanged(side)
        context.fireChannelWritabilityChanged()
    }

    func errorCaught(context: ChannelHandlerContext, error: Error) {
        context.close(promise: nil)
    }
}
