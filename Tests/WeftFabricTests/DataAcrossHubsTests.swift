import Foundation
import Logging
import WeftAgent
import WeftChunks
import WeftCluster
import WeftFabric
import WeftLink
import WeftNet
import WeftProto
import WeftTestSupport
import WeftVFS
import XCTest

/// Data across hubs (SPEC.md §12.5) with real hubs on loopback: a real etcd, cluster hubs
/// (`FabricHub` served by `HubServer` over TCP, as weftd does), agents through the same
/// `HubOpener` path as `weft mount`, and a `weft-link` emulator on the hub2 → hub1 route.
final class DataAcrossHubsTests: XCTestCase {
    private var etcd: EtcdProcess!
    private var hubs: [HubFixture] = []
    private var links: [LinkEmulator] = []
    private var agents: [(VFS, [RemoteHub])] = []
    private var root: String!

    final class HubFixture {
        let name: String
        let directory: String
        let fabric: FabricHub
        let server: HubServer
        let member: ClusterMember
        let etcd: EtcdClient
        let address: String
        var id: UInt16 { member.hubID }

        init(name: String, directory: String, endpoint: String, cacheBytes: UInt64) throws {
            self.name = name
            self.directory = directory
            let logger = testLogger("hub." + name)
            let knownID = try FabricHub.prepare(directory: directory, cluster: "weft", name: name)
            etcd = try EtcdClient(endpoint: endpoint)
            member = try ClusterMember(etcd: etcd, cluster: "weft", hubName: name, address: "", logger: logger)
            fabric = FabricHub(directory: directory, member: member, durability: .strict, logger: logger,
                               cacheBytes: cacheBytes, connectPeer: { address in
                                   RemoteHub(address: try HubAddress.parse("weft://" + address), connectTimeoutMs: 2000,
                                             requestTimeoutMs: 20_000, logger: logger)
                               })
            server = HubServer(hub: fabric, logger: logger)
            let port = try server.listen(host: "127.0.0.1", port: 0)
            address = "127.0.0.1:\(port)"
            member.address = address
            try FabricHub.recordID(try member.join(knownID: knownID), directory: directory)
            try fabric.start()
        }

        func stop() {
            member.leave()
            server.shutdown()
            fabric.close()
            etcd.close()
        }
    }

    override func setUpWithError() throws {
        etcd = try EtcdProcess()
        root = NSTemporaryDirectory() + "weft-data-\(UUID().uuidString)"
        try FileManager.default.createDirectory(atPath: root, withIntermediateDirectories: true)
    }

    override func tearDownWithError() throws {
        for (vfs, connections) in agents {
            try? vfs.shutdown()
            for connection in connections { connection.close() }
        }
        for link in links { link.shutdown() }
        for hub in hubs { hub.stop() }
        etcd?.stop()
        if let root { try? FileManager.default.removeItem(atPath: root) }
    }

    // MARK: Fixture

    @discardableResult
    private func startHub(_ name: String, cacheBytes: UInt64 = 1 << 30) throws -> HubFixture {
        let hub = try HubFixture(name: name, directory: root + "/" + name, endpoint: etcd.endpoint, cacheBytes: cacheBytes)
        hubs.append(hub)
        return hub
    }

    /// Volume `v` (1 MiB chunks, no compression) homed at `home`, known to every hub's map.
    private func createVolume(at home: HubFixture) throws -> VolumeRecord {
        let json = try home.fabric.createVolume(name: "v", home: home.name, chunkSizeBytes: 1 << 20, compression: .none)
        let record = try JSONDecoder().decode(VolumeRecord.self, from: Data(json))
        for hub in hubs {
            XCTAssertTrue(hub.member.waitUntil(timeoutMs: 10_000) { $0.volumes["v"] != nil })
        }
        return record
    }

    /// hub1 and hub2, and volume `v` homed at hub1.
    private func twoHubsWithVolume() throws -> (HubFixture, HubFixture, VolumeRecord) {
        let hub1 = try startHub("hub1")
        let hub2 = try startHub("hub2")
        return (hub1, hub2, try createVolume(at: hub1))
    }

    /// Routes `from` → `to` through a link emulator with `delayMs` each way; returns it.
    private func link(from: HubFixture, to: HubFixture, delayMs: Int) throws -> LinkEmulator {
        let parts = to.address.split(separator: ":")
        let emulator = LinkEmulator(target: String(parts[0]), port: Int(parts[1])!, settings: LinkSettings(delayMs: delayMs),
                                    logger: testLogger("link"))
        let port = try emulator.listen(host: "127.0.0.1", port: 0)
        links.append(emulator)
        let keys = ClusterKeys(cluster: "weft")
        try from.etcd.put(keys.route(from: from.name, to: to.name),
                          try JSONEncoder().encode(RouteRecord(address: "127.0.0.1:\(port)")))
        for hub in hubs {
            XCTAssertTrue(hub.member.waitUntil(timeoutMs: 10_000) { $0.routes[from.name]?[to.name] != nil })
        }
        return emulator
    }

    /// An agent mounting the volume through `hub`, as `weft mount weft://HUB/v` does.
    private func agent(through hub: HubFixture, name: String) throws -> VFS {
        let (api, connections) = try HubOpener.openVolumeAPI(address: try HubAddress.parse("weft://" + hub.address),
                                                             volume: "v", logger: testLogger("agent." + name))
        var options = VFSOptions()
        options.agentName = name
        options.volume = "v"
        options.cacheBytes = 64 << 20
        let vfs = try VFS(hub: api, options: options, logger: testLogger("agent." + name))
        agents.append((vfs, connections))
        return vfs
    }

    private func writeFile(_ vfs: VFS, _ name: String, _ data: [UInt8]) throws {
        let (_, handle) = try vfs.create(.root, parent: InodeNumbers.root, name: bytes(name), mode: 0o644, umask: 0,
                                         flags: O_RDWR | O_CREAT)
        _ = try data.withUnsafeBytes { try vfs.write(handle: handle, offset: 0, data: $0) }
        try vfs.fsync(handle: handle)
        try vfs.release(handle: handle)
    }

    private func readFile(_ vfs: VFS, _ name: String) throws -> [UInt8] {
        let attributes = try vfs.lookup(.root, parent: InodeNumbers.root, name: bytes(name))
        let (handle, _) = try vfs.open(.root, ino: attributes.ino, flags: O_RDONLY)
        defer { try? vfs.release(handle: handle) }
        return try vfs.read(handle: handle, offset: 0, size: Int(attributes.size) + 1).bytes()
    }

    private func objectFiles(_ hub: HubFixture, _ volume: VolumeRecord, _ store: String) -> [String] {
        let base = "\(hub.directory)/volumes/\(volume.id)/\(store)"
        var found: [String] = []
        for fanOut in 0..<256 {
            let directory = base + "/" + String(format: "%02x", fanOut)
            for name in (try? FileManager.default.contentsOfDirectory(atPath: directory)) ?? [] where name.count == 16 {
                found.append(directory + "/" + name)
            }
        }
        return found.sorted()
    }

    private func corrupt(_ path: String) throws {
        let handle = try XCTUnwrap(FileHandle(forUpdatingAtPath: path))
        let size = handle.seekToEndOfFile()
        handle.seek(toFileOffset: size - 100)
        let byte = handle.readData(ofLength: 1)
        handle.seek(toFileOffset: size - 100)
        handle.write(Data([byte[0] ^ 0xFF]))
        handle.closeFile()
    }

    // MARK: Tests

    func testAHubAnswersVolumeSessionsOnlyOnceItHasJoined() throws {
        let hub1 = try startHub("hub1")
        _ = try createVolume(at: hub1)

        // hub2 started as weftd starts a hub (also after a crash): listening first, joined later.
        let directory = root + "/hub2"
        let logger = testLogger("hub.hub2")
        let knownID = try FabricHub.prepare(directory: directory, cluster: "weft", name: "hub2")
        let etcdClient = try EtcdClient(endpoint: etcd.endpoint)
        let member = try ClusterMember(etcd: etcdClient, cluster: "weft", hubName: "hub2", address: "", logger: logger)
        let fabric = FabricHub(directory: directory, member: member, durability: .strict, logger: logger)
        let server = HubServer(hub: fabric, logger: logger)
        defer {
            member.leave()
            server.shutdown()
            fabric.close()
            etcdClient.close()
        }
        let port = try server.listen(host: "127.0.0.1", port: 0)
        let client = RemoteHub(address: try HubAddress.parse("weft://127.0.0.1:\(port)"), connectTimeoutMs: 2000,
                               requestTimeoutMs: 20_000, logger: logger)
        defer { client.close() }

        final class Outcome: @unchecked Sendable { var error: Error? }
        let outcome = Outcome()
        let done = DispatchSemaphore(value: 0)
        Thread.detachNewThread {
            do { _ = try client.openSession(agentName: "early", volume: "v") } catch { outcome.error = error }
            done.signal()
        }
        XCTAssertEqual(done.wait(timeout: .now() + 1), .timedOut, "the open waits while the hub has not joined")
        member.address = "127.0.0.1:\(port)"
        try FabricHub.recordID(try member.join(knownID: knownID), directory: directory)
        try fabric.start()
        XCTAssertEqual(done.wait(timeout: .now() + 20), .success)
        // Answered from the joined map: the volume is homed at hub1 (EREMOTE names it), not "no such volume".
        XCTAssertEqual((outcome.error as? WeftError)?.errno, EREMOTE, "\(String(describing: outcome.error))")
        XCTAssertTrue((outcome.error as? WeftError)?.message.contains("hub1") ?? false)
    }

    func testWriterObjectsLandInTheWritersHubAndLayoutsRecordIt() throws {
        let (hub1, hub2, volume) = try twoHubsWithVolume()
        var random = SeededRandom(seed: 7)
        let data = random.bytes(2_500_000)
        let writer = try agent(through: hub2, name: "writer")
        try writeFile(writer, "f", data)

        let written = objectFiles(hub2, volume, "chunks")
        XCTAssertEqual(written.count, 3, "2.5 MB in 1 MiB chunks: three objects, at the writer's hub")
        XCTAssertEqual(objectFiles(hub1, volume, "chunks"), [], "the home stores none of them")
        let home = RemoteHub(address: try HubAddress.parse("weft://" + hub1.address), logger: testLogger("check"))
        defer { home.close() }
        let (session, _) = try home.openSession(agentName: "check", volume: "v")
        let context = RequestContext(session: session, credentials: .root)
        let file = try home.lookup(context, parent: InodeNumbers.root, name: bytes("f"))
        let (_, lists) = try home.layout(context, ino: file.ino, firstChunk: 0, count: 3)
        XCTAssertEqual(lists.flatMap { $0 }.map(\.hub), [hub2.id, hub2.id, hub2.id], "layouts record the holder")

        // A reader in the home's region reads through the home, which fetches from hub2.
        let reader = try agent(through: hub1, name: "home-reader")
        XCTAssertEqual(try readFile(reader, "f"), data)
        XCTAssertEqual(hub1.fabric.readThrough.fetches, 3)
        XCTAssertEqual(objectFiles(hub1, volume, "cache").count, 3)
        // A second agent of hub2 reads the writer's objects from hub2's own store: no fetch, and
        // as stored blocks (its own hub is their only holder).
        XCTAssertEqual(try readFile(try agent(through: hub2, name: "reader2"), "f"), data)
        XCTAssertEqual(hub2.fabric.readThrough.fetches, 0)
        XCTAssertGreaterThan(agents.last!.1.reduce(0) { $0 + $1.storedBlockReadCount }, 0)
    }

    func testGarbageAtTheHomeIsDeletedAtTheHolderAndFromCaches() throws {
        let (hub1, hub2, volume) = try twoHubsWithVolume()
        var random = SeededRandom(seed: 8)
        let writer = try agent(through: hub2, name: "writer")
        try writeFile(writer, "doomed", random.bytes(2_500_000))
        let kept = random.bytes(1_500_000)
        try writeFile(writer, "kept", kept)
        XCTAssertEqual(objectFiles(hub2, volume, "chunks").count, 5)
        let reader = try agent(through: hub1, name: "home-reader")
        _ = try readFile(reader, "doomed")
        XCTAssertEqual(try readFile(reader, "kept"), kept)
        XCTAssertEqual(objectFiles(hub1, volume, "cache").count, 5, "the home keeps read-through copies")

        try writer.unlink(.root, parent: InodeNumbers.root, name: bytes("doomed"))
        XCTAssertTrue(eventually(timeoutSeconds: 20) { self.objectFiles(hub2, volume, "chunks").count == 2 },
                      "the home's GC deletes the holder's objects: \(objectFiles(hub2, volume, "chunks").count) left")
        XCTAssertTrue(eventually(timeoutSeconds: 20) { self.objectFiles(hub1, volume, "cache").count == 2 },
                      "and the home's cached copies")
        XCTAssertEqual(hub1.fabric.readThrough.cachedBytes, UInt64(objectFiles(hub1, volume, "cache").reduce(0) {
            $0 + ((try? FileManager.default.attributesOfItem(atPath: $1)[.size] as? Int) ?? 0)
        }), "the cache's accounting follows")
        // What is still referenced is untouched, at the holder and in the cache.
        XCTAssertEqual(try readFile(try agent(through: hub2, name: "reader2"), "kept"), kept)
        XCTAssertEqual(try readFile(try agent(through: hub1, name: "home-reader2"), "kept"), kept)
    }

    func testConcurrentReadersOfAMissingObjectCauseOneFetchAndOneWANCrossing() throws {
        let (hub1, hub2, volume) = try twoHubsWithVolume()
        let wan = try link(from: hub2, to: hub1, delayMs: 100)
        var random = SeededRandom(seed: 11)
        let data = random.bytes(1 << 20)
        try writeFile(try agent(through: hub1, name: "writer"), "f", data)
        XCTAssertEqual(objectFiles(hub1, volume, "chunks").count, 1)

        let readers = try (0..<8).map { try agent(through: hub2, name: "reader\($0)") }
        let before = wan.currentStats
        var results = [[UInt8]](repeating: [], count: readers.count)
        let lock = NSLock()
        DispatchQueue.concurrentPerform(iterations: readers.count) { index in
            let got = (try? readFile(readers[index], "f")) ?? []
            lock.withLock { results[index] = got }
        }
        let after = wan.currentStats
        for (index, got) in results.enumerated() { XCTAssertEqual(got, data, "reader \(index)") }
        XCTAssertEqual(hub2.fabric.readThrough.fetches, 1, "eight readers, one fetch (single flight)")
        let crossed = (after.bytesBackward - before.bytesBackward)
        XCTAssertGreaterThanOrEqual(crossed, UInt64(data.count), "the object crossed hub1 → hub2")
        XCTAssertLessThan(crossed, UInt64(data.count) * 12 / 10, "and it crossed once, not once per reader")
    }

    func testCacheIsBoundedWithLeastRecentlyReadEviction() throws {
        let hub1 = try startHub("hub1")
        let hub2 = try startHub("hub2", cacheBytes: 2_200_000)
        let volume = try createVolume(at: hub1)
        let writer = try agent(through: hub1, name: "writer")
        var random = SeededRandom(seed: 3)
        var files: [[UInt8]] = []
        for index in 0..<4 {
            files.append(random.bytes(1_000_000))
            try writeFile(writer, "f\(index)", files[index])
        }
        // hub2's own writes (in chunks/) are never evicted.
        let local = try agent(through: hub2, name: "local-writer")
        try writeFile(local, "mine", random.bytes(900_000))
        XCTAssertEqual(objectFiles(hub2, volume, "chunks").count, 1)

        for index in 0..<4 {
            // A fresh agent each time: its own block cache must not hide the hub's.
            XCTAssertEqual(try readFile(try agent(through: hub2, name: "r\(index)"), "f\(index)"), files[index])
        }
        let cache = hub2.fabric.readThrough
        XCTAssertEqual(cache.fetches, 4)
        XCTAssertEqual(cache.evictions, 2, "two ~1 MB objects fit under 2.2 MB")
        XCTAssertLessThanOrEqual(cache.cachedBytes, 2_200_000)
        XCTAssertEqual(objectFiles(hub2, volume, "cache").count, 2)
        XCTAssertEqual(objectFiles(hub2, volume, "chunks").count, 1, "the hub's own objects stay")

        // f2 is read again (now most recent), then f0 (evicted) must be fetched again and
        // evict f3, the least recently read.
        XCTAssertEqual(try readFile(try agent(through: hub2, name: "again2"), "f2"), files[2])
        XCTAssertEqual(cache.fetches, 4, "a cached object is not fetched again")
        XCTAssertEqual(try readFile(try agent(through: hub2, name: "again0"), "f0"), files[0])
        XCTAssertEqual(cache.fetches, 5)
        XCTAssertEqual(try readFile(try agent(through: hub2, name: "again2b"), "f2"), files[2])
        XCTAssertEqual(cache.fetches, 5, "f2 was more recent than f3 and stayed")
        XCTAssertEqual(try readFile(try agent(through: hub2, name: "again3"), "f3"), files[3])
        XCTAssertEqual(cache.fetches, 6, "f3 was the least recently read and was evicted")
    }

    /// A cluster hub serves stored blocks (opcode 49, sent from the file unread) of the objects
    /// in its own store and in its read-through cache. A cached copy damaged on its disk fails
    /// the agent's check; the agent reads the range again through the hub's `readSlice`, whose
    /// check deletes the copy and fetches a good one: the bytes come back whole.
    func testAClusterHubServesStoredBlocksAndADamagedCachedCopyIsReplaced() throws {
        let (hub1, hub2, volume) = try twoHubsWithVolume()
        var random = SeededRandom(seed: 21)
        let data = random.bytes(1_500_000)
        try writeFile(try agent(through: hub1, name: "writer"), "f", data)
        func storedReads() -> Int { agents.last!.1.reduce(0) { $0 + $1.storedBlockReadCount } }

        // Through the home: its own store.
        XCTAssertEqual(try readFile(try agent(through: hub1, name: "home-reader"), "f"), data)
        XCTAssertGreaterThan(storedReads(), 0, "the home served stored blocks")
        // Through hub2: fetched into its cache, then served from there as stored blocks.
        XCTAssertEqual(try readFile(try agent(through: hub2, name: "reader"), "f"), data)
        XCTAssertGreaterThan(storedReads(), 0, "hub2 served stored blocks from its cache")
        XCTAssertEqual(hub2.fabric.readThrough.fetches, 2)

        let cached = objectFiles(hub2, volume, "cache")
        XCTAssertEqual(cached.count, 2)
        for path in cached { try corrupt(path) }
        XCTAssertEqual(try readFile(try agent(through: hub2, name: "after-damage"), "f"), data)
        XCTAssertEqual(hub2.fabric.readThrough.fetches, 4, "each damaged copy was fetched again")
    }

    func testDamagedHolderCopyIsRetriedAtTheHomeAndNoGoodCopyGivesEIO() throws {
        let hub1 = try startHub("hub1")
        let hub2 = try startHub("hub2")
        let hub3 = try startHub("hub3")
        let volume = try createVolume(at: hub1)
        var random = SeededRandom(seed: 5)
        let good = random.bytes(300_000)
        let lost = random.bytes(300_000)
        let writer = try agent(through: hub2, name: "writer")
        try writeFile(writer, "good", good)
        let goodObject = try XCTUnwrap(objectFiles(hub2, volume, "chunks").first)
        try writeFile(writer, "lost", lost)
        let lostObject = try XCTUnwrap(objectFiles(hub2, volume, "chunks").first { $0 != goodObject })

        // A second copy of "good" at the home (as an admin-placed replica would be), then
        // damage hub2's copies of both objects on disk.
        let relative = goodObject.dropFirst("\(hub2.directory)/volumes/\(volume.id)/chunks/".count)
        let replica = "\(hub1.directory)/volumes/\(volume.id)/chunks/\(relative)"
        try FileManager.default.copyItem(atPath: goodObject, toPath: replica)
        try corrupt(goodObject)
        try corrupt(lostObject)

        let reader = try agent(through: hub3, name: "reader")
        XCTAssertEqual(try readFile(reader, "good"), good, "the damaged copy at hub2 was refused; the home's was used")
        XCTAssertEqual(hub3.fabric.readThrough.fetches, 1)
        XCTAssertErrno(EIO, try readFile(reader, "lost"), "no good copy anywhere: EIO, never wrong bytes")
        XCTAssertEqual(objectFiles(hub3, volume, "cache").count, 1, "nothing of the damaged object was kept")
    }
}
