import Foundation
import XCTest
@testable import WeftVFS

/// The pool behind large read slabs (SPEC.md §7, Memory bound): freed memory is reused and the
/// slabs in use plus the pooled ones stay within the budget.
final class SlabMemoryTests: XCTestCase {
    private let mib = 1 << 20
    private var savedBudget = 0

    override func setUp() {
        super.setUp()
        SlabMemory.drain()
        savedBudget = SlabMemory.budgetBytes
        XCTAssertEqual(SlabMemory.usage.live, 0, "no large slab is alive from an earlier test")
        setBudget(8 * mib)
    }

    override func tearDown() {
        SlabMemory.drain()
        setBudget(savedBudget)
        super.tearDown()
    }

    private func setBudget(_ bytes: Int) {
        SlabMemory.lock.withLock { SlabMemory.budget = bytes }
    }

    func testFreedSlabsAreReusedWithinTheBudget() {
        var slabs = (0..<4).map { _ in Slab(capacity: 3 * mib + 5) }
        XCTAssertEqual(SlabMemory.usage.live, 16 * mib, "sized in whole MiB")
        let addresses = Set(slabs.map(\.pointer))
        slabs.removeAll()
        XCTAssertEqual(SlabMemory.usage.live, 0)
        XCTAssertEqual(SlabMemory.usage.pooled, 8 * mib, "only what fits the budget is kept")

        let exact = Slab(capacity: 4 * mib)
        XCTAssertTrue(addresses.contains(exact.pointer), "an equal size is reused")
        let smaller = Slab(capacity: 2 * mib + 1)
        XCTAssertTrue(addresses.contains(smaller.pointer), "a pooled slab up to twice the size serves a smaller one")
        XCTAssertEqual(SlabMemory.usage.pooled, 0)
        XCTAssertEqual(SlabMemory.usage.live, 8 * mib)
        exact.pointer.storeBytes(of: 0xAB, as: UInt8.self)
        smaller.pointer.advanced(by: 3 * mib).storeBytes(of: 0xCD, as: UInt8.self)
        XCTAssertEqual(smaller.capacity, 2 * mib + 1, "the caller sees the size it asked for")
    }

    func testAMissFreesPooledMemoryBeyondTheBudget() {
        var slabs = [Slab(capacity: 4 * mib), Slab(capacity: 4 * mib)]
        slabs.removeAll()
        XCTAssertEqual(SlabMemory.usage.pooled, 8 * mib)
        // 1 MiB: no pooled slab fits (4 MiB is more than twice as large), and a new one would
        // pass the budget, so pooled memory is freed first.
        let small = Slab(capacity: mib)
        XCTAssertEqual(SlabMemory.usage.live, mib)
        XCTAssertEqual(SlabMemory.usage.pooled, 4 * mib)
        XCTAssertLessThanOrEqual(SlabMemory.usage.live + SlabMemory.usage.pooled, SlabMemory.budgetBytes)
        _ = small
    }

    func testSmallSlabsAreNotPooled() {
        var slab: Slab? = Slab(capacity: 64 * 1024)
        XCTAssertEqual(SlabMemory.usage.live, 0)
        slab = nil
        XCTAssertNil(slab)
        XCTAssertEqual(SlabMemory.usage.pooled, 0)
    }

    func testCacheBoundRaisesTheBudgetAndDrainEmptiesThePool() {
        _ = BlockCache(capacityBytes: 32 * mib)
        XCTAssertEqual(SlabMemory.budgetBytes, 32 * mib)
        _ = BlockCache(capacityBytes: 16 * mib)
        XCTAssertEqual(SlabMemory.budgetBytes, 32 * mib, "several caches share the largest bound")
        var slabs = (0..<3).map { _ in Slab(capacity: 4 * mib) }
        slabs.removeAll()
        XCTAssertEqual(SlabMemory.usage.pooled, 12 * mib)
        SlabMemory.drain()
        XCTAssertEqual(SlabMemory.usage.pooled, 0)
    }

    func testBlockCacheRemoveAllHandsItsSlabsToThePool() throws {
        let cache = BlockCache(capacityBytes: 32 * mib)
        var slab: Slab? = Slab(capacity: 2 * mib)
        let blockBytes = 64 * 1024
        for index in 0..<32 {
            cache.fill(.init(object: 7, block: UInt32(index)),
                       CachedBlock(slab: try XCTUnwrap(slab), offset: index * blockBytes, length: blockBytes))
        }
        XCTAssertEqual(cache.usedBytes, 2 * mib)
        XCTAssertNotNil(cache.get(.init(object: 7, block: 31)))
        let pointer = try XCTUnwrap(slab).pointer
        XCTAssertEqual(cache.removeAll(), 2 * mib)
        XCTAssertEqual(cache.usedBytes, 0)
        XCTAssertNil(cache.get(.init(object: 7, block: 0)))
        XCTAssertEqual(SlabMemory.usage.pooled, 0, "this test still holds the slab")
        slab = nil
        XCTAssertEqual(SlabMemory.usage.pooled, 2 * mib, "the last block went: the memory is pooled")
        let reused = Slab(capacity: 2 * mib)
        XCTAssertEqual(reused.pointer, pointer)
    }
}
