import Foundation
import WeftCluster
import WeftProto
import WeftTestSupport
import XCTest

/// The etcd client and cluster membership against a real etcd started by the test.
final class EtcdClusterTests: XCTestCase {
    private var etcd: EtcdProcess!
    private var clients: [EtcdClient] = []
    private var members: [ClusterMember] = []

    override func setUpWithError() throws {
        etcd = try EtcdProcess()
    }

    override func tearDownWithError() throws {
        for member in members { member.leave() }
        for client in clients { client.close() }
        etcd?.stop()
    }

    private func client() throws -> EtcdClient {
        let client = try EtcdClient(endpoint: etcd.endpoint)
        clients.append(client)
        return client
    }

    func testKeysRoundTripAndCreateIsExclusive() throws {
        let kv = try client()
        XCTAssertNil(try kv.get("/t/a").0)
        let revision = try kv.put("/t/a", Data("one".utf8))
        XCTAssertGreaterThan(revision, 0)
        try kv.put("/t/b", Data("two".utf8))
        try kv.put("/u/c", Data("three".utf8))
        XCTAssertEqual(try kv.get("/t/a").0?.value, Data("one".utf8))
        let (listed, listRevision) = try kv.list(prefix: "/t/")
        XCTAssertEqual(listed.map(\.key), ["/t/a", "/t/b"])
        XCTAssertGreaterThanOrEqual(listRevision, revision)
        XCTAssertTrue(try kv.create("/t/new", Data("x".utf8)))
        XCTAssertFalse(try kv.create("/t/new", Data("y".utf8)))
        XCTAssertEqual(try kv.get("/t/new").0?.value, Data("x".utf8))
        try kv.delete("/t/a")
        XCTAssertNil(try kv.get("/t/a").0)
    }

    func testTransactionComparesModRevision() throws {
        let kv = try client()
        try kv.put("/t/counter", Data("1".utf8))
        let seen = try XCTUnwrap(try kv.get("/t/counter").0)
        try kv.put("/t/counter", Data("2".utf8))  // a concurrent change
        XCTAssertFalse(try kv.transaction(compare: [.init(key: "/t/counter", modRevision: seen.modRevision)],
                                          puts: [("/t/counter", Data("stale".utf8), 0)]))
        let fresh = try XCTUnwrap(try kv.get("/t/counter").0)
        XCTAssertTrue(try kv.transaction(compare: [.init(key: "/t/counter", modRevision: fresh.modRevision)],
                                         puts: [("/t/counter", Data("3".utf8), 0)]))
        XCTAssertEqual(try kv.get("/t/counter").0?.value, Data("3".utf8))
    }

    func testLeasedKeyGoesWithItsLease() throws {
        let kv = try client()
        let lease = try kv.grantLease(ttlSeconds: 30)
        try kv.put("/t/leased", Data("here".utf8), lease: lease)
        XCTAssertEqual(try kv.get("/t/leased").0?.lease, lease)
        XCTAssertGreaterThan(try kv.keepAlive(lease: lease), 0)
        try kv.revokeLease(lease)
        XCTAssertNil(try kv.get("/t/leased").0)
        XCTAssertEqual(try kv.keepAlive(lease: lease), 0, "a revoked lease cannot be renewed")
    }

    func testWatchSeesPutsAndDeletesInOrder() throws {
        let kv = try client()
        let (_, revision) = try kv.list(prefix: "/w/")
        let seen = NSCondition()
        var events: [WatchEvent] = []
        let watch = try kv.watch(prefix: "/w/", fromRevision: revision + 1, onEvents: { batch, _ in
            seen.lock()
            events += batch
            seen.broadcast()
            seen.unlock()
        }, onEnd: { _ in })
        defer { watch.cancel() }
        try kv.put("/w/x", Data("1".utf8))
        try kv.put("/x/outside", Data("no".utf8))
        try kv.delete("/w/x")
        seen.lock()
        let deadline = Date(timeIntervalSinceNow: 10)
        while events.count < 2 && seen.wait(until: deadline) {}
        seen.unlock()
        XCTAssertEqual(events.map(\.kind), [.put, .delete])
        XCTAssertEqual(events.map(\.keyValue.key), ["/w/x", "/w/x"])
        XCTAssertEqual(events.first?.keyValue.value, Data("1".utf8))
    }

    func testUnreachableEtcdFailsFastWithEIO() throws {
        let kv = try EtcdClient(endpoint: "http://127.0.0.1:\(try freePort())", requestTimeoutMs: 2000)
        defer { kv.close() }
        XCTAssertErrno(EIO, try kv.get("/t/a"))
        XCTAssertErrno(EINVAL, try EtcdClient(endpoint: "nonsense"))
    }

    /// A closed client refuses calls (ESHUTDOWN) instead of connecting on its stopped event
    /// loop, which NIO traps on in debug builds: a member's renewal loop could make such a call
    /// after its hub left and closed the client (it crashed a CI run of the fabric tests).
    func testCallsOnAClosedClientFailWithESHUTDOWNAlsoWhileItCloses() throws {
        let kv = try EtcdClient(endpoint: etcd.endpoint)
        try kv.put("/t/k", Data("v".utf8))
        final class Counts: @unchecked Sendable {
            let lock = NSLock()
            var answered = 0, refused = 0, other: [String] = []
        }
        let counts = Counts()
        let callers = DispatchGroup()
        for _ in 0..<4 {
            callers.enter()
            Thread.detachNewThread {
                defer { callers.leave() }
                for _ in 0..<200 {
                    do {
                        _ = try kv.get("/t/k")
                        counts.lock.withLock { counts.answered += 1 }
                    } catch let error as WeftError where error.errno == ESHUTDOWN {
                        counts.lock.withLock { counts.refused += 1 }
                        return
                    } catch {
                        counts.lock.withLock { counts.other.append("\(error)") }   // cut off mid-request
                    }
                }
            }
        }
        Thread.sleep(forTimeInterval: 0.1)
        kv.close()
        XCTAssertEqual(callers.wait(timeout: .now() + 30), .success)
        XCTAssertGreaterThan(counts.answered, 0)
        XCTAssertLessThanOrEqual(counts.other.count, 4, "\(counts.other)")
        XCTAssertErrno(ESHUTDOWN, try kv.get("/t/k"))
        XCTAssertErrno(ESHUTDOWN, try kv.put("/t/k", Data("w".utf8)))
    }

    func testIDsAreUniqueUnderContention() throws {
        let kv = try client()
        let keys = ClusterKeys(cluster: "ids")
        var ids = [UInt16](repeating: 0, count: 8)
        let lock = NSLock()
        DispatchQueue.concurrentPerform(iterations: 8) { index in
            let id = try? ClusterAdmin.allocateID(etcd: kv, counter: keys.hubIDCounter, claim: keys.hubID("h\(index)"))
            lock.lock()
            ids[index] = id ?? 0
            lock.unlock()
        }
        XCTAssertEqual(Set(ids), Set(1...8))
        XCTAssertEqual(try ClusterAdmin.allocateID(etcd: kv, counter: keys.hubIDCounter, claim: keys.hubID("h3")), ids[3],
                       "a claimed name keeps its id")
    }

    func testMembersSeeEachOtherAndVolumes() throws {
        let a = try ClusterMember(etcd: try client(), cluster: "c1", hubName: "hub-a", address: "127.0.0.1:1", logger: testLogger("a"))
        let b = try ClusterMember(etcd: try client(), cluster: "c1", hubName: "hub-b", address: "127.0.0.1:2", logger: testLogger("b"))
        members = [a, b]
        XCTAssertEqual(try a.join(knownID: nil), 1)
        XCTAssertEqual(try b.join(knownID: nil), 2)
        let revision = b.map.revision
        XCTAssertTrue(a.waitForRevision(revision, timeoutMs: 5000))
        XCTAssertEqual(Set(a.map.hubs.keys), ["hub-a", "hub-b"])
        XCTAssertEqual(a.map.hubs["hub-b"]?.address, "127.0.0.1:2")
        XCTAssertEqual(a.map.address(of: "hub-b", from: "hub-a"), "127.0.0.1:2")

        let kv = try client()
        let keys = ClusterKeys(cluster: "c1")
        let (volume, created) = try ClusterAdmin.createVolume(etcd: kv, keys: keys, name: "data", home: "hub-b",
                                                               chunkSizeBytes: 4 << 20, compression: "none")
        XCTAssertEqual(volume.id, 1)
        XCTAssertErrno(EEXIST, try ClusterAdmin.createVolume(etcd: kv, keys: keys, name: "data", home: "hub-a",
                                                             chunkSizeBytes: 4 << 20, compression: "none"))
        XCTAssertErrno(EINVAL, try ClusterAdmin.createVolume(etcd: kv, keys: keys, name: "a/b", home: "hub-a",
                                                             chunkSizeBytes: 4 << 20, compression: "none"))
        XCTAssertTrue(a.waitForRevision(created, timeoutMs: 5000))
        XCTAssertEqual(a.map.volumes["data"]?.home, "hub-b")

        try kv.put(keys.route(from: "hub-a", to: "hub-b"), try JSONEncoder().encode(RouteRecord(address: "127.0.0.1:9")))
        let routed = try kv.get(keys.route(from: "hub-a", to: "hub-b")).revision
        XCTAssertTrue(a.waitForRevision(routed, timeoutMs: 5000))
        XCTAssertEqual(a.map.address(of: "hub-b", from: "hub-a"), "127.0.0.1:9")
        XCTAssertEqual(a.map.address(of: "hub-b", from: "hub-c"), "127.0.0.1:2")

        // A hub that leaves disappears from the others' maps; a rejoin keeps its id.
        b.leave()
        let gone = try kv.get("/weft/c1/none").revision
        XCTAssertTrue(a.waitForRevision(gone, timeoutMs: 5000))
        XCTAssertNil(a.map.hubs["hub-b"])
        XCTAssertEqual(a.map.hubIDs["hub-b"], 2)
        let again = try ClusterMember(etcd: try client(), cluster: "c1", hubName: "hub-b", address: "127.0.0.1:3", logger: testLogger("b2"))
        members.append(again)
        XCTAssertEqual(try again.join(knownID: 2), 2)
        XCTAssertErrno(EINVAL, try ClusterMember(etcd: try client(), cluster: "c1", hubName: "hub-a", address: "x:1",
                                                 logger: testLogger("a2")).join(knownID: 7))
    }
}
