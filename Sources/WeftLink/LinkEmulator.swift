import Logging
import NIOCore
import NIOPosix

/// Shaping of one emulated WAN link. Both directions get the same settings.
public struct LinkSettings: Sendable, Equatable {
    /// One-way delay added to every byte, in each direction (the RTT grows by twice this).
    public var delayMs: Int
    /// Bandwidth cap of each direction in bytes per second, shared by all connections; nil is unlimited.
    public var rateBytesPerSecond: Int?

    public init(delayMs: Int = 0, rateBytesPerSecond: Int? = nil) {
        precondition(delayMs >= 0 && (rateBytesPerSecond ?? 1) > 0)
        self.delayMs = delayMs
        self.rateBytesPerSecond = rateBytesPerSecond
    }
}

/// Counters of one link since it started.
public struct LinkStats: Sendable, Equatable {
    /// Bytes delivered from accepted connections to the target.
    public var bytesForward: UInt64
    /// Bytes delivered from the target back to accepted connections.
    public var bytesBackward: UInt64
    /// Connections open now (accepted, whether joined to the target yet or not).
    public var connections: Int
    /// Connections accepted since start.
    public var accepted: UInt64
    public var cut: Bool

    public var json: String {
        "{\"bytesForward\":\(bytesForward),\"bytesBackward\":\(bytesBackward),\"connections\":\(connections)," +
            "\"accepted\":\(accepted),\"cut\":\(cut)}"
    }
}

/// A user-space WAN link: a TCP relay from `listen` to `target` that delays, paces, counts and
/// can partition the traffic (SPEC.md §12.8).
///
/// Guarantees: bytes of one connection arrive in order, each no earlier than `delayMs` after the
/// relay read it, and no faster than the rate cap allows for its direction; while cut, nothing
/// is forwarded either way, no close is passed on, and sources are not read (TCP backpressure),
/// and new connections are accepted but joined to the target only at heal; heal resumes exactly
/// where the cut stopped. Memory per direction of a connection is bounded by `queueHighWater`
/// bytes queued (reading pauses beyond it). All state lives on one event loop thread.
public final class LinkEmulator: @unchecked Sendable {
    public static let queueHighWater = 8 << 20

    let group: MultiThreadedEventLoopGroup
    let loop: EventLoop
    let logger: Logger
    let targetHost: String
    let targetPort: Int

    // Loop-confined state.
    var settings: LinkSettings
    var isCut = false
    var pipes: [ObjectIdentifier: RelayPipe] = [:]
    var forwardLane = Lane()
    var backwardLane = Lane()
    var stats = LinkStats(bytesForward: 0, bytesBackward: 0, connections: 0, accepted: 0, cut: false)
    private var listener: Channel?

    public init(target host: String, port: Int, settings: LinkSettings, logger: Logger) {
        self.group = MultiThreadedEventLoopGroup(numberOfThreads: 1)
        self.loop = group.next()
        self.logger = logger
        self.targetHost = host
        self.targetPort = port
        self.settings = settings
    }

    /// Starts listening on `host:port` (port 0 picks one); returns the bound port.
    public func listen(host: String, port: Int) throws -> Int {
        let bootstrap = ServerBootstrap(group: group)
            .serverChannelOption(ChannelOptions.backlog, value: 256)
            .serverChannelOption(ChannelOptions.socketOption(.so_reuseaddr), value: 1)
            .childChannelOption(ChannelOptions.autoRead, value: false)
            .childChannelInitializer { [self] channel in
                channel.eventLoop.makeCompletedFuture { try self.accepted(channel) }
            }
        let channel = try bootstrap.bind(host: host, port: port).wait()
        try loop.submit { self.listener = channel }.wait()
        return channel.localAddress?.port ?? port
    }

    public func cut() { run { self.setCut(true) } }
    public func heal() { run { self.setCut(false) } }
    public func update(_ settings: LinkSettings) { run { self.settings = settings } }
    public var currentSettings: LinkSettings { run { self.settings } }
    public var currentStats: LinkStats {
        run {
            var stats = self.stats
            stats.connections = self.pipes.count
            stats.cut = self.isCut
            return stats
        }
    }

    /// Closes every relayed connection (both ends), as a reset of the link would.
    public func resetConnections() {
        run { for pipe in self.pipes.values { pipe.closeBoth() } }
    }

    public func shutdown() {
        run {
            self.listener?.close(promise: nil)
            for pipe in self.pipes.values { pipe.closeBoth() }
        }
        try? group.syncShutdownGracefully()
    }

    // MARK: Loop-confined internals

    private func run<T>(_ body: @escaping () -> T) -> T {
        if loop.inEventLoop { return body() }
        // swiftlint:disable:next force_try
        return try! loop.submit(body).wait()
    }

    private func accepted(_ channel: Channel) throws {
        let pipe = RelayPipe(link: self, client: channel)
        pipes[ObjectIdentifier(pipe)] = pipe
        stats.accepted += 1
        try channel.pipeline.syncOperations.addHandler(RelayHandler(pipe: pipe, side: .client))
    }

    func removed(_ pipe: RelayPipe) {
        pipes.removeValue(forKey: ObjectIdentifier(pipe))
    }

    private func setCut(_ cut: Bool) {
        guard cut != isCut else { return }
        isCut = cut
        logger.info(cut ? "link cut" : "link healed")
        for pipe in pipes.values {
            if cut { pipe.pause() } else { pipe.resume() }
        }
    }
}

/// The pacing state of one direction of the link, shared by its connections.
struct Lane {
    /// When the emulated wire is free again.
    var freeAt = NIODeadline.uptimeNanoseconds(0)
}
