#if canImport(Glibc)
import Glibc
#endif
import Foundation
import Logging
import WeftTestSupport
import XCTest
import WeftHub
import WeftNet
import WeftProto

/// How a test reaches the hub: the in-process `Hub` itself, or a `RemoteHub` talking TCP over
/// 127.0.0.1 to a `HubServer` that serves the same `Hub`.
enum HubTransport: String {
    case inProcess
    case tcp
    /// TCP, with the server offering co-located reads and the client taking them, and its
    /// writes (SPEC.md §4, Co-located reads and writes): reads come from the store, objects are
    /// written into it and handed over, everything else goes over TCP.
    case tcpLocalReads

    var isNetwork: Bool { self != .inProcess }
}

/// A freshly formatted hub volume in its own temporary directory, reached through one transport.
/// `api` is what tests call; `hub` is the in-process hub that owns the volume (for inspecting or
/// damaging its files). `shutdown()` stops everything and removes the directory.
final class HubUnderTest {
    let transport: HubTransport
    let directory: String
    /// The hub's read cache bound (0: none); by default weftd's (TCP) have one.
    let readCacheBytes: Int
    private(set) var hub: Hub!
    private(set) var api: HubAPI!
    private(set) var server: HubServer?
    private var remote: RemoteHub?
    /// The TCP port the server listens on (nil in process).
    private(set) var port: Int?
    private var isShutDown = false

    /// `recover: false` leaves background maintenance (garbage collection, compaction) stopped
    /// until the test calls `hub.recover()` itself. `readCacheBytes` nil: 64 MiB over TCP, else 0.
    init(transport: HubTransport, chunkSizeBytes: Int = 65536, compression: Compression = .none,
         recover: Bool = true, readCacheBytes: Int? = nil) throws {
        self.transport = transport
        self.readCacheBytes = readCacheBytes ?? (transport.isNetwork ? 64 << 20 : 0)
        directory = NSTemporaryDirectory() + "weft-hub-test-\(getpid())-\(UInt64.random(in: 0...UInt64.max))"
        try Hub.format(directory: directory, chunkSizeBytes: chunkSizeBytes, compression: compression, force: false)
        try start(recover: recover)
    }

    private func start(recover: Bool) throws {
        // Over TCP the hub is weftd's: reads stay in the page cache (SPEC.md §3.2, Direct I/O).
        // The TCP suite runs with a read cache (SPEC.md §4, Hub read cache; off in a default
        // weftd, which the integration tests run), so that every case goes through it too.
        hub = try Hub(directory: directory, durability: .strict, pageCacheReads: transport.isNetwork,
                      readCacheBytes: readCacheBytes, logger: testLogger("weft.hub.test"))
        if recover { try hub.recover() }
        switch transport {
        case .inProcess:
            api = hub
        case .tcp, .tcpLocalReads:
            let server = HubServer(hub: hub, logger: testLogger("weft.hub.server"), workerThreads: 8, eventLoopThreads: 1)
            let port = try server.listen(host: "127.0.0.1", port: 0)
            let remote = RemoteHub(address: .tcp(host: "127.0.0.1", port: port), connectTimeoutMs: 5000,
                                   requestTimeoutMs: 30000, logger: testLogger("weft.hub.client"))
            if transport == .tcpLocalReads {
                try server.offerLocalReads(chunkDirectory: hub.chunks.directory)
                remote.localReads = true
                remote.localWrites = true
            }
            self.server = server
            self.remote = remote
            self.port = port
            api = remote
        }
    }

    /// Stops the transport and the hub (as a process exit would, after `close()`), then opens
    /// the same directory again and recovers. The caller must drop its references to `api`
    /// and `hub` first: the volume can only be opened once.
    /// `whileStopped` runs between the two (to leave behind what a crash would).
    /// `syncingJournaled: false` closes the hub as a crash would leave the objects whose bytes
    /// the metadata journal carries: unsynced, their keys kept (SPEC.md §5).
    /// `recover: false` opens it again without `recover()` (background maintenance stopped).
    func restart(syncingJournaled: Bool = true, recover: Bool = true, whileStopped: () -> Void = {}) throws {
        stop(syncingJournaled: syncingJournaled)
        whileStopped()
        try start(recover: recover)
    }

    private func stop(syncingJournaled: Bool = true) {
        remote?.close()
        server?.shutdown()
        try? hub?.close(syncingJournaled: syncingJournaled)
        remote = nil
        server = nil
        port = nil
        api = nil
        hub = nil
    }

    func shutdown() {
        guard !isShutDown else { return }
        isShutDown = true
        stop()
        try? FileManager.default.removeItem(atPath: directory)
    }

    /// The file of chunk object `id` under `DIR/chunks/`, found by walking the tree.
    func chunkFile(of id: SliceID) -> String? { Self.chunkFile(of: id, in: directory) }

    /// The file of chunk object `id` under `directory/chunks/` (any hub directory).
    static func chunkFile(of id: SliceID, in directory: String) -> String? {
        let wanted = String(format: "%016llx", id)
        let root = directory + "/chunks"
        guard let walker = FileManager.default.enumerator(atPath: root) else { return nil }
        while let relative = walker.nextObject() as? String {
            if (relative as NSString).lastPathComponent == wanted { return root + "/" + relative }
        }
        return nil
    }
}

/// The caller used unless a test says otherwise.
let rootCaller = Credentials.root
let alice = Credentials(uid: 1000, gid: 1000)
let bob = Credentials(uid: 1001, gid: 1001)

/// File type bits as `UInt32`, as `Attributes.mode` holds them.
let regularFile = UInt32(S_IFREG)
let directoryType = UInt32(S_IFDIR)




/// Base for suites that run against both transports: `transport` picks one; every hub made
/// through `makeHub` is shut down and removed in `tearDown`.
class HubTestCase: XCTestCase {
    /// Subclasses override to run the same tests over another transport.
    class var transport: HubTransport { .inProcess }

    var fixtures: [HubUnderTest] = []

    func makeHub(chunkSizeBytes: Int = 65536, compression: Compression = .none,
                 recover: Bool = true) throws -> HubUnderTest {
        let fixture = try HubUnderTest(transport: Self.transport, chunkSizeBytes: chunkSizeBytes,
                                       compression: compression, recover: recover)
        fixtures.append(fixture)
        return fixture
    }

    override func tearDown() {
        for fixture in fixtures.reversed() { fixture.shutdown() }
        fixtures.removeAll()
        super.tearDown()
    }
}

/// A test case whose hubs (`fixtures`) are shut down, and whose `cleanups` run (last first),
/// when each test ends, failed or not.
class FixtureTestCase: XCTestCase {
    var fixtures: [HubUnderTest] = []
    var cleanups: [() -> Void] = []

    override func tearDown() {
        for cleanup in cleanups.reversed() { cleanup() }
        cleanups = []
        for fixture in fixtures { fixture.shutdown() }
        fixtures = []
        super.tearDown()
    }
}
