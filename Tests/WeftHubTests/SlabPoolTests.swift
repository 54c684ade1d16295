#if canImport(Glibc)
import Glibc
#endif
import Foundation
import XCTest
@testable import WeftVFS

/// The pool behind large read slabs (SPEC.md §7, Slab memory): freed memory is reused, and the
/// slabs in use plus the pooled ones stay within the budget. Each test has a pool of its own.
final class SlabPoolTests: XCTestCase {
    private let mib = 1 << 20

    func testFreedSlabsAreReusedWithinTheBudget() {
        let pool = SlabPool(budgetBytes: 8 * mib)
        var slabs = (0..<4).map { _ in Slab(capacity: 3 * mib + 5, pool: pool) }
        XCTAssertEqual(pool.usage.live, 16 * mib, "sized in whole MiB")
        let addresses = Set(slabs.map(\.pointer))
        slabs.removeAll()
        XCTAssertEqual(pool.usage.live, 0)
        XCTAssertEqual(pool.usage.pooled, 8 * mib, "only what fits the budget is kept")

        let exact = Slab(capacity: 4 * mib, pool: pool)
        XCTAssertTrue(addresses.contains(exact.pointer), "an equal size is reused")
        let smaller = Slab(capacity: 2 * mib + 1, pool: pool)
        XCTAssertTrue(addresses.contains(smaller.pointer), "a pooled slab up to twice the size serves a smaller one")
        XCTAssertEqual(pool.usage.pooled, 0)
        XCTAssertEqual(pool.usage.live, 8 * mib)
        exact.pointer.storeBytes(of: 0xAB, as: UInt8.self)
        smaller.pointer.advanced(by: 3 * mib).storeBytes(of: 0xCD, as: UInt8.self)
        XCTAssertEqual(smaller.capacity, 2 * mib + 1, "the caller sees the size it asked for")
    }

    func testAMissFreesPooledMemoryBeyondTheBudget() {
        let pool = SlabPool(budgetBytes: 8 * mib)
        var slabs = [Slab(capacity: 4 * mib, pool: pool), Slab(capacity: 4 * mib, pool: pool)]
        slabs.removeAll()
        XCTAssertEqual(pool.usage.pooled, 8 * mib)
        // 1 MiB: no pooled slab fits (4 MiB is more than twice as large), and a new one would
        // pass the budget, so pooled memory is freed first.
        let small = Slab(capacity: mib, pool: pool)
        XCTAssertEqual(pool.usage.live, mib)
        XCTAssertEqual(pool.usage.pooled, 4 * mib)
        XCTAssertLessThanOrEqual(pool.usage.live + pool.usage.pooled, pool.budgetBytes)
        withExtendedLifetime(small) {}
    }

    /// Fresh slab memory is faulted in when it is taken (on the fetching thread), not page by
    /// page where the reply is first copied into it.
    func testFreshSlabMemoryIsResidentWhenTaken() throws {
        let pool = SlabPool(budgetBytes: 8 * mib)
        let slab = Slab(capacity: 4 * mib, pool: pool)
        let pages = 4 * mib / Int(getpagesize())
        var resident = [UInt8](repeating: 0, count: pages)
        XCTAssertEqual(mincore(slab.pointer, 4 * mib, &resident), 0, String(cString: strerror(errno)))
        XCTAssertEqual(resident.filter { $0 & 1 == 0 }.count, 0, "pages not yet resident")
    }

    func testSmallSlabsAreNotPooled() {
        let pool = SlabPool(budgetBytes: 8 * mib)
        var slab: Slab? = Slab(capacity: 64 * 1024, pool: pool)
        XCTAssertEqual(pool.usage.live, 0)
        slab = nil
        XCTAssertNil(slab)
        XCTAssertEqual(pool.usage.pooled, 0)
    }

    func testCacheBoundRaisesTheBudgetAndDrainEmptiesThePool() {
        let pool = SlabPool(budgetBytes: 8 * mib)
        _ = BlockCache(capacityBytes: 32 * mib, slabs: pool)
        XCTAssertEqual(pool.budgetBytes, 32 * mib)
        _ = BlockCache(capacityBytes: 16 * mib, slabs: pool)
        XCTAssertEqual(pool.budgetBytes, 32 * mib, "several caches share the largest bound")
        var slabs = (0..<3).map { _ in Slab(capacity: 4 * mib, pool: pool) }
        slabs.removeAll()
        XCTAssertEqual(pool.usage.pooled, 12 * mib)
        pool.drain()
        XCTAssertEqual(pool.usage.pooled, 0)
    }

    func testBlockCacheRemoveAllHandsItsSlabsToThePool() throws {
        let pool = SlabPool(budgetBytes: 8 * mib)
        let cache = BlockCache(capacityBytes: 32 * mib, slabs: pool)
        var slab: Slab? = Slab(capacity: 2 * mib, pool: cache.slabs)
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
        XCTAssertEqual(pool.usage.pooled, 0, "this test still holds the slab")
        slab = nil
        XCTAssertEqual(pool.usage.pooled, 2 * mib, "the last block went: the memory is pooled")
        let reused = Slab(capacity: 2 * mib, pool: pool)
        XCTAssertEqual(reused.pointer, pointer)
    }
}
