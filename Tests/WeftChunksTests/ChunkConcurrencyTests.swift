import Foundation
import WeftChunks
import WeftProto
import WeftTestSupport
import XCTest

final class ChunkConcurrencyTests: ChunkTestCase {
    /// The expected content of object `id`: derived from the id, so any thread can check any read.
    static func content(_ id: SliceID) -> [UInt8] {
        var random = SeededRandom(seed: id)
        let length = Int(random.next() % 300_000)
        return id % 3 == 0 ? TestData.random(length, &random) : TestData.compressible(length, &random)
    }

    /// Many threads write, read, verify, delete and sync at once; every read returns the right
    /// bytes or ENOENT for a deleted object, and the accounting adds up.
    func testConcurrentWritersReadersDeletersAndSyncs() throws {
        let store = try makeStore(.zstd)
        let threads = 8
        let perThread = 40
        let lock = NSLock()
        var written: [SliceID] = []
        var deleted = Set<SliceID>()
        var failures: [String] = []
        DispatchQueue.concurrentPerform(iterations: threads) { thread in
            var random = SeededRandom(seed: UInt64(thread) + 100)
            for step in 0..<perThread {
                let id = SliceID(thread * 1000 + step)
                do {
                    try store.write(id: id, data: Self.content(id))
                    lock.lock(); written.append(id); lock.unlock()
                    for _ in 0..<4 {
                        lock.lock(); let target = written[Int(random.next() % UInt64(written.count))]; lock.unlock()
                        let expected = Self.content(target)
                        let offset = expected.isEmpty ? 0 : Int(random.next() % UInt64(expected.count))
                        let length = Int(random.next() % UInt64(expected.count - offset + 1))
                        do {
                            let got = try store.read(id: target, offset: offset, length: length)
                            if got != Array(expected[offset..<offset + length]) {
                                lock.lock(); failures.append("wrong bytes from \(target)"); lock.unlock()
                            }
                        } catch let error as WeftError where error.errno == ENOENT {
                            lock.lock(); let wasDeleted = deleted.contains(target); lock.unlock()
                            if !wasDeleted { lock.lock(); failures.append("\(target) missing"); lock.unlock() }
                        }
                    }
                    if step % 5 == 4 {
                        let victim = SliceID(thread * 1000 + step - 2)
                        lock.lock(); deleted.insert(victim); lock.unlock()
                        try store.delete(id: victim)
                    }
                    if step % 7 == 0 { try store.sync() }
                    if step % 11 == 0 { _ = try store.verify(id: id) }
                } catch {
                    lock.lock(); failures.append("thread \(thread) step \(step): \(error)"); lock.unlock()
                }
            }
        }
        XCTAssertEqual(failures, [])
        try store.sync()
        let live = Set(written).subtracting(deleted)
        XCTAssertEqual(store.objectCount, UInt64(live.count))
        var listedBytes: UInt64 = 0
        var listed = Set<SliceID>()
        try store.forEach { id, stored, _ in listed.insert(id); listedBytes += stored }
        XCTAssertEqual(listed, live)
        XCTAssertEqual(store.storedBytes, listedBytes)
        for id in live { XCTAssertEqual(try store.read(id: id, offset: 0, length: Self.content(id).count), Self.content(id)) }
        XCTAssertTrue(log.errors.isEmpty, "\(log.errors)")
    }

    /// Racing writers of one id: exactly one succeeds, the others get EEXIST.
    func testRacingWritersOfOneIdExactlyOneWins() throws {
        let store = try makeStore()
        for round in 0..<20 {
            let id = SliceID(round)
            let lock = NSLock()
            var successes = 0
            var others: [String] = []
            DispatchQueue.concurrentPerform(iterations: 8) { thread in
                do {
                    try store.write(id: id, data: [UInt8](repeating: UInt8(thread), count: 70_000))
                    lock.lock(); successes += 1; lock.unlock()
                } catch let error as WeftError where error.errno == EEXIST {
                } catch {
                    lock.lock(); others.append("\(error)"); lock.unlock()
                }
            }
            XCTAssertEqual(successes, 1, "round \(round)")
            XCTAssertEqual(others, [])
            let bytes = try store.read(id: id, offset: 0, length: 70_000)
            XCTAssertEqual(Set(bytes).count, 1)
        }
        XCTAssertEqual(store.objectCount, 20)
    }

    /// Many readers of the same objects while the cache evicts: no wrong bytes, no errors.
    func testConcurrentReadersUnderCacheEviction() throws {
        let store = try makeStore(.zstd)
        let count = ChunkStore.openObjectCacheCapacity + 100
        let contents = (0..<50).map { Self.content(SliceID($0)) }
        for id in 0..<SliceID(count) { try store.write(id: id, data: contents[Int(id % 50)]) }
        let lock = NSLock()
        var failures: [String] = []
        DispatchQueue.concurrentPerform(iterations: 8) { thread in
            var random = SeededRandom(seed: UInt64(thread))
            for _ in 0..<400 {
                let id = SliceID(random.next() % UInt64(count))
                let expected = contents[Int(id % 50)]
                let offset = expected.isEmpty ? 0 : Int(random.next() % UInt64(expected.count))
                let length = min(expected.count - offset, 100_000)
                do {
                    if try store.read(id: id, offset: offset, length: length) != Array(expected[offset..<offset + length]) {
                        lock.lock(); failures.append("wrong bytes from \(id)"); lock.unlock()
                    }
                } catch {
                    lock.lock(); failures.append("\(id): \(error)"); lock.unlock()
                }
            }
        }
        XCTAssertEqual(failures, [])
    }

    /// Readers racing deletes see the right bytes or ENOENT, and deleted objects stay gone.
    func testReadersRacingDeletesNeverSeeWrongBytes() throws {
        let store = try makeStore()
        let ids = (0..<200).map { SliceID($0) }
        for id in ids { try store.write(id: id, data: Self.content(id)) }
        let lock = NSLock()
        var failures: [String] = []
        DispatchQueue.concurrentPerform(iterations: 6) { thread in
            if thread == 0 {
                for id in ids { try? store.delete(id: id) }
                return
            }
            for id in ids {
                let expected = Self.content(id)
                do {
                    if try store.read(id: id, offset: 0, length: expected.count) != expected {
                        lock.lock(); failures.append("wrong bytes from \(id)"); lock.unlock()
                    }
                } catch let error as WeftError where error.errno == ENOENT {
                } catch {
                    lock.lock(); failures.append("\(id): \(error)"); lock.unlock()
                }
            }
        }
        XCTAssertEqual(failures, [])
        for id in ids {
            XCTAssertFalse(store.exists(id: id))
            assertErrno(ENOENT, try store.read(id: id, offset: 0, length: 0))
        }
        XCTAssertEqual(store.objectCount, 0)
        XCTAssertEqual(store.storedBytes, 0)
    }

    /// Concurrent sync callers all return, and share passes.
    func testConcurrentSyncCallers() throws {
        let store = try makeStore()
        let lock = NSLock()
        var failures: [String] = []
        DispatchQueue.concurrentPerform(iterations: 8) { thread in
            for step in 0..<30 {
                do {
                    try store.write(id: SliceID(thread * 100 + step), data: [UInt8(step)])
                    try store.sync()
                } catch {
                    lock.lock(); failures.append("\(error)"); lock.unlock()
                }
            }
        }
        XCTAssertEqual(failures, [])
        XCTAssertEqual(store.objectCount, 240)
    }
}
