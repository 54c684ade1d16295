import Foundation
import WeftProto
import XCTest

/// `WorkerPool` runs as many blocking items at once as it has threads (Dispatch's queues run
/// about one per CPU on Linux, which stalled read-ahead and recalls).
final class WorkerPoolTests: XCTestCase {
    /// Items that each wait until all of them have started: they finish only if they all run at once.
    private final class Barrier: @unchecked Sendable {
        let condition = NSCondition()
        var started = 0
        var finished = 0
        let parties: Int
        init(parties: Int) { self.parties = parties }

        /// Waits for every party, at most `seconds`; false if they did not all arrive.
        func arriveAndWait(seconds: Double) -> Bool {
            condition.lock()
            defer { condition.unlock() }
            started += 1
            condition.broadcast()
            let deadline = Date().addingTimeInterval(seconds)
            while started < parties {
                if !condition.wait(until: deadline) { return false }
            }
            finished += 1
            condition.broadcast()
            return true
        }

        func waitFinished(seconds: Double) -> Int {
            condition.lock()
            defer { condition.unlock() }
            let deadline = Date().addingTimeInterval(seconds)
            while finished < parties, condition.wait(until: deadline) {}
            return finished
        }
    }

    func testEveryThreadRunsABlockingItemAtOnce() {
        let threads = 8
        let pool = WorkerPool(name: "test-pool", threads: threads)
        let barrier = Barrier(parties: threads)
        for _ in 0..<threads { pool.async { _ = barrier.arriveAndWait(seconds: 5) } }
        XCTAssertEqual(barrier.waitFinished(seconds: 10), threads, "all \(threads) items ran at the same time")
    }

    func testItemsBeyondTheThreadsWaitTheirTurnAndAllRunInOrder() {
        let pool = WorkerPool(name: "test-order", threads: 1)
        let lock = NSLock()
        var order: [Int] = []
        let done = DispatchSemaphore(value: 0)
        for index in 0..<2000 {
            pool.async {
                lock.withLock { order.append(index) }
                if index == 1999 { done.signal() }
            }
        }
        XCTAssertEqual(done.wait(timeout: .now() + 10), .success)
        XCTAssertEqual(lock.withLock { order }, Array(0..<2000), "one thread runs the queue in order, none lost")
    }

    func testRunConcurrentlyRunsEveryItemAtOnceAndReturnsWhenAllAreDone() {
        let items = Array(0..<6)
        let barrier = Barrier(parties: items.count)
        final class Arrivals: @unchecked Sendable {
            let lock = NSLock()
            var byItem: [Int: Bool] = [:]
        }
        let arrivals = Arrivals()
        WorkerPool.runConcurrently(items) { item in
            let ok = barrier.arriveAndWait(seconds: 5)
            arrivals.lock.withLock { arrivals.byItem[item] = ok }
        }
        XCTAssertEqual(arrivals.lock.withLock { arrivals.byItem }, Dictionary(uniqueKeysWithValues: items.map { ($0, true) }),
                       "every item ran while all the others were running, and all were done on return")
    }
}
