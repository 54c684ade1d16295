#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif
import Logging
import NIOCore
import NIOPosix
import WeftProto

/// Serves a `HubAPI` implementation to agents over TCP and Unix sockets.
///
/// Guarantees: hub methods run on a pool of `workerThreads` threads, never on an event loop; a
/// connection has at most `maxInFlightRequestsPerConnection` requests running, and beyond that
/// the server stops reading from it; responses go back as soon as they are ready, tagged with
/// their request id; when a connection ends, every session opened through it is closed on the hub
/// (releasing that agent's open files); a malformed frame closes only its own connection, with a
/// log line. At most `maxConnections` connections are served at once; more are closed on accept.
/// With `idleTimeoutMs`, a connection that sends nothing for that long (agents ping every
/// `RemoteHub.heartbeatMs`) is closed, ending its sessions.
public final class HubServer: @unchecked Sendable {
    /// Default size of the worker pool; hub methods block on disk I/O and fsync.
    public static let defaultWorkerThreads = 16
    public static let defaultMaxInFlightRequestsPerConnection = 512
    public static let defaultMaxConnections = 1024
    /// Longest wait in `shutdown()` for running requests and session clean-up to finish.
    public static let shutdownDrainTimeoutMs = 30_000

    private let core: ServerCore
    private let group: MultiThreadedEventLoopGroup
    private let logger: Logger
    private let maxConnections: Int
    private let idleTimeoutMs: Int?

    private let lock = PthreadMutex()
    private var listeners: [Channel] = []
    private var connections: [ObjectIdentifier: Channel] = [:]
    private var unixSocketPaths: [String] = []
    private var isShutDown = false

    public init(hub: HubAPI, logger: Logger,
                workerThreads: Int = HubServer.defaultWorkerThreads,
                eventLoopThreads: Int = min(System.coreCount, 4),
                maxInFlightRequestsPerConnection: Int = HubServer.defaultMaxInFlightRequestsPerConnection,
                maxConnections: Int = HubServer.defaultMaxConnections,
                idleTimeoutMs: Int? = nil) {
        precondition(workerThreads > 0 && eventLoopThreads > 0 && maxInFlightRequestsPerConnection > 0 && maxConnections > 0)
        precondition((idleTimeoutMs ?? 1) > 0)
        self.idleTimeoutMs = idleTimeoutMs
        let pool = NIOThreadPool(numberOfThreads: workerThreads)
        pool.start()
        self.core = ServerCore(hub: hub, pool: pool, logger: logger,
                               maxInFlightRequestsPerConnection: maxInFlightRequestsPerConnection)
        self.group = MultiThreadedEventLoopGroup(numberOfThreads: eventLoopThreads)
        self.logger = logger
        self.maxConnections = maxConnections
    }

    /// Starts accepting TCP connections on `host:port`; port 0 picks a free port. Returns the bound port.
    @discardableResult
    public func listen(host: String, port: Int) throws -> Int {
        let channel = try bind("\(host):\(port)") { $0.bind(host: host, port: port) }
        let bound = channel.localAddress?.port ?? port
        logger.info("hub listening", metadata: ["address": "\(host):\(bound)"])
        return bound
    }

    /// Starts accepting connections on a Unix socket at `unixSocketPath` (a stale socket file
    /// there is replaced). The file is removed by `shutdown()`.
    public func listen(unixSocketPath: String) throws {
        _ = try bind(unixSocketPath) { $0.bind(unixDomainSocketPath: unixSocketPath, cleanupExistingSocketFile: true) }
        lock.withLock { unixSocketPaths.append(unixSocketPath) }
        logger.info("hub listening", metadata: ["address": "unix:\(unixSocketPath)"])
    }

    /// Number of agent connections currently open.
    public var connectionCount: Int { lock.withLock { connections.count } }

    /// Stops listening, closes every connection, waits (bounded) for running requests and for
    /// the departed agents' sessions to be closed, then stops the threads. Idempotent.
    public func shutdown() {
        let snapshot: ([Channel], [Channel], [String])? = lock.withLock {
            if isShutDown { return nil }
            isShutDown = true
            return (listeners, Array(connections.values), unixSocketPaths)
        }
        guard let (listeners, connections, paths) = snapshot else { return }
        for channel in listeners { try? channel.close().wait() }
        for channel in connections { try? channel.close().wait() }
        if !core.waitUntilIdle(timeoutMs: Self.shutdownDrainTimeoutMs) {
            logger.warning("hub shutdown: requests still running after \(Self.shutdownDrainTimeoutMs) ms")
        }
        try? core.pool.syncShutdownGracefully()
        try? group.syncShutdownGracefully()
        for path in paths { unlink(path) }
        logger.info("hub server stopped")
    }

    deinit {
        if !isShutDown { logger.warning("HubServer released without shutdown(): its threads leak") }
    }

    private func bind(_ address: String, _ body: (ServerBootstrap) -> EventLoopFuture<Channel>) throws -> Channel {
        try lock.withLock {
            if isShutDown { throw WeftError(ESHUTDOWN, "hub server is shut down") }
        }
        let channel: Channel
        do {
            channel = try body(bootstrap()).wait()
        } catch let error as IOError {
            throw WeftError(error.errnoCode, "cannot listen on \(address): \(error)")
        } catch {
            throw WeftError(EIO, "cannot listen on \(address): \(error)")
        }
        lock.withLock { listeners.append(channel) }
        return channel
    }

    private func bootstrap() -> ServerBootstrap {
        let core = self.core
        let idleTimeoutMs = self.idleTimeoutMs
        return ServerBootstrap(group: group)
            .serverChannelOption(ChannelOptions.backlog, value: 256)
            .serverChannelOption(ChannelOptions.socketOption(.so_reuseaddr), value: 1)
            .childChannelOption(ChannelOptions.recvAllocator,
                                value: AdaptiveRecvByteBufferAllocator(minimum: 64, initial: 4096, maximum: 256 * 1024))
            .childChannelOption(ChannelOptions.allocator, value: BulkMemory.allocator)
            .childChannelInitializer { [weak self] channel in
                guard let self, self.admit(channel) else { return channel.close() }
                do {
                    if let idleTimeoutMs {
                        // An agent pings every few seconds; silence this long means it is gone
                        // or cut off: its sessions (and their locks) end with the connection.
                        try channel.pipeline.syncOperations.addHandler(
                            IdleStateHandler(readTimeout: .milliseconds(Int64(idleTimeoutMs))))
                    }
                    try channel.pipeline.syncOperations.addHandlers(
                        ByteToMessageHandler(FrameDecoder()), HubConnectionHandler(core: core))
                    return channel.eventLoop.makeSucceededVoidFuture()
                } catch {
                    return channel.eventLoop.makeFailedFuture(error)
                }
            }
    }

    /// Registers a new connection, or refuses it when the server is at its bound or shutting down.
    private func admit(_ channel: Channel) -> Bool {
        let admitted: Bool = lock.withLock {
            guard !isShutDown, connections.count < maxConnections else { return false }
            connections[ObjectIdentifier(channel)] = channel
            return true
        }
        guard admitted else {
            logger.warning("refusing agent connection", metadata: [
                "peer": "\(channel.remoteAddress?.description ?? "unix peer")",
                "reason": "server is shutting down or has \(maxConnections) connections"])
            return false
        }
        channel.closeFuture.whenComplete { [weak self] _ in
            guard let self else { return }
            self.lock.withLock { _ = self.connections.removeValue(forKey: ObjectIdentifier(channel)) }
        }
        return true
    }
}
